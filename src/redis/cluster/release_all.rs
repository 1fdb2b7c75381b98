//! `release_all` on a cluster: `release_all.lua` on every master, in
//! slots mode for an owner (each master visits the owner's index of every
//! slot it serves) and namespace mode otherwise; the counts summed. Also
//! the per-master `SCAN` that lists locks.

use std::sync::LazyLock;

use futures_util::future::join_all;
use redis::Value;
use redis::cluster_routing::{
    AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};

use super::slots::{owner_index_parts, tag_slot};
use crate::error::{BackendError, BackendErrorKind, LockError};
use crate::redis::RedisProvider;
use crate::redis::error::unexpected;
use crate::redis::layout::slot_tags;
use crate::redis::scripts::RELEASE_ALL;
use crate::redis::scripts::release_all::ReleaseAllArgs;

/// `lua/release_all.lua` for a Redis Cluster, flagged to touch keys of
/// several slots (those one master serves): its slots and namespace modes
/// visit keys the caller cannot name up front. A shebang must open a
/// script, so the flags come before the prelude (`allow-oom`: a flagged
/// script is otherwise refused while the server is out of memory, when
/// releasing matters most). Sent with `EVAL` to every
/// master (release_all is rare; the servers cache it by its hash).
static SOURCE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "#!lua flags=allow-cross-slot-keys,allow-oom\n{}",
        RELEASE_ALL.source()
    )
});

/// A master's address.
type Address = (String, u16);

/// How often `release_all` follows slots that moved while it ran.
const MAX_ROUNDS: usize = 5;

/// `release_all.lua`'s slots mode: an owner's indexes of the slots one
/// master serves.
struct SlotsArgs<'a> {
    /// ARGV[2]: the owner.
    owner: &'a str,
    /// ARGV[3]: how long a reservation lasts unclaimed, ms.
    claim_ms: u64,
    /// ARGV[4]: queued processes are told (on their slots' channels).
    notify: bool,
    /// ARGV[5], ARGV[6]: the index's name around the slot tag.
    parts: &'a (String, String),
    /// ARGV[7..]: the slots.
    slots: Vec<u16>,
}

impl SlotsArgs<'_> {
    fn command(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SOURCE.as_str())
            .arg(0)
            .arg("slots")
            .arg(self.owner)
            .arg(self.claim_ms)
            .arg(if self.notify { "1" } else { "" })
            .arg(&self.parts.0)
            .arg(&self.parts.1);
        for slot in &self.slots {
            cmd.arg(&slot_tags()[*slot as usize]);
        }
        cmd
    }
}

impl RedisProvider {
    /// See the module docs.
    pub(crate) async fn release_all_cluster(&self, owner: Option<&str>) -> Result<u64, LockError> {
        let layout = &self.inner.layout;
        let Some(owner) = owner else {
            let pattern = layout.scan_pattern();
            let args = ReleaseAllArgs::Namespace {
                namespace: layout.namespace(),
                pattern: &pattern,
                // Queued processes are not told: their channels are per
                // slot, which this script cannot name; they find the locks
                // gone at their next attempt (within the fallback period).
                channel_prefix: "",
            };
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SOURCE.as_str()).arg(0).arg(&args.argv()[..]);
            let routing = RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::Aggregate(AggregateOp::Sum)),
            ));
            return ReleaseAllArgs::decode(self.route("release_all", cmd, routing).await?);
        };
        // Each master visits the owner's index of every slot it serves
        // (some 5,000 probes, a few ms of script time); a slot that moved
        // meanwhile is skipped there and retried where it went.
        let parts = owner_index_parts(layout, owner);
        let mut pending: Vec<u16> = (0..slot_tags().len() as u16).collect();
        let mut released = 0;
        for _ in 0..MAX_ROUNDS {
            let masters = self.slot_masters(&pending).await?;
            let calls = masters.into_iter().map(|((host, port), slots)| {
                let args = SlotsArgs {
                    owner,
                    claim_ms: self.inner.claim_ms,
                    notify: self.inner.waiting.is_some(),
                    parts: &parts,
                    slots,
                };
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                self.route("release_all", args.command(), routing)
            });
            pending.clear();
            for reply in join_all(calls).await {
                let (count, skipped): (u64, Vec<String>) =
                    redis::from_redis_value(reply?).map_err(|e| unexpected("release_all", e))?;
                released += count;
                pending.extend(skipped.iter().filter_map(|t| tag_slot(t)));
            }
            if pending.is_empty() {
                return Ok(released);
            }
        }
        Err(unexpected(
            "release_all",
            format!("{} slots kept moving between masters", pending.len()),
        ))
    }

    /// Every key matching `pattern` (string keys only) on every master,
    /// in pages: a `SCAN` cursor per master, the masters one after another.
    /// A slot that moves meanwhile may be seen twice or not at all, as with
    /// any `SCAN`.
    pub(crate) async fn scan_cluster(
        &self,
        pattern: &str,
        count: usize,
    ) -> Result<Vec<Vec<String>>, LockError> {
        let all: Vec<u16> = (0..slot_tags().len() as u16).collect();
        let mut pages = Vec::new();
        for ((host, port), _) in self.slot_masters(&all).await? {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(count)
                    .arg("TYPE")
                    .arg("string");
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                let reply = self.route("list", cmd, routing).await?;
                let (next, keys): (u64, Vec<String>) =
                    redis::from_redis_value(reply).map_err(|e| unexpected("list", e))?;
                if !keys.is_empty() {
                    pages.push(keys);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(pages)
    }

    /// The masters serving `slots` (by address), with their share of them.
    async fn slot_masters(&self, slots: &[u16]) -> Result<Vec<(Address, Vec<u16>)>, LockError> {
        let reply = self
            .route(
                "release_all",
                redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let ranges = parse_slots(reply)?;
        let mut masters: Vec<(Address, Vec<u16>)> = Vec::new();
        for &slot in slots {
            let Some((_, _, address)) = ranges.iter().find(|(f, l, _)| (*f..=*l).contains(&slot))
            else {
                return Err(LockError::Backend(BackendError::new(
                    BackendErrorKind::Unavailable,
                    "release_all",
                    format!("no master serves hash slot {slot}"),
                    None,
                )));
            };
            match masters.iter_mut().find(|(a, _)| a == address) {
                Some((_, s)) => s.push(slot),
                None => masters.push((address.clone(), vec![slot])),
            }
        }
        Ok(masters)
    }

    /// Sends `cmd` where `routing` says, on the shared cluster connection.
    async fn route(
        &self,
        operation: &'static str,
        cmd: redis::Cmd,
        routing: RoutingInfo,
    ) -> Result<Value, LockError> {
        self.inner
            .conns
            .run(operation, |conn| conn.route(cmd, routing))
            .await
    }
}

/// `CLUSTER SLOTS`: `[[first, last, [host, port, id, ...], replicas...], ...]`,
/// as (first slot, last slot, master).
fn parse_slots(reply: Value) -> Result<Vec<(u16, u16, Address)>, LockError> {
    let Value::Array(ranges) = reply else {
        return Err(unexpected(
            "release_all",
            format!("CLUSTER SLOTS: {reply:?}"),
        ));
    };
    Ok(ranges
        .into_iter()
        .filter_map(|r| match r {
            Value::Array(r) if r.len() >= 3 => {
                let first = redis::from_redis_value::<u16>(r[0].clone()).ok()?;
                let last = redis::from_redis_value::<u16>(r[1].clone()).ok()?;
                let Value::Array(node) = &r[2] else {
                    return None;
                };
                let host = redis::from_redis_value::<String>(node.first()?.clone()).ok()?;
                let port = redis::from_redis_value::<u16>(node.get(1)?.clone()).ok()?;
                Some((first, last, (host, port)))
            }
            _ => None,
        })
        .collect())
}
