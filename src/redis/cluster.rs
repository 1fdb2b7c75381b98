//! Redis Cluster (feature `cluster`): requests split by hash slot.
//!
//! On a cluster a script may only touch keys of one hash slot. The key
//! layout already keeps a lock, its fencing counter and its wait queue in
//! one slot; an owner's index is split by slot here
//! ([`Layout::slot_owner_index`](super::layout::Layout::slot_owner_index)),
//! so each slot's share of a request is one ordinary script call:
//!
//! - **acquire**: the slots are taken one after another, in slot order, all
//!   with the request's nonce. When one finds a lock held, the slots already
//!   taken are released by that nonce (so re-entered locks stay), and the
//!   request waits and retries whole. The fixed order means two requests
//!   over the same keys never each hold a part the other needs. Locks the
//!   owner already held keep their lease until every slot said yes (the
//!   give-back by nonce cannot touch them); then they are extended.
//! - **release** and **extend**: every slot at once. An extension that
//!   finds one slot's lock lost reports it; the slots it did extend are
//!   still the caller's.
//! - **release_all**: one script on every master (see `lua/release_all.lua`,
//!   slots and namespace modes), each atomic on its master.
//!
//! Release notifications go by sharded pub/sub, a channel per slot and
//! process: see `shards.rs`.

use futures_util::future::join_all;
use redis::Value;
use redis::cluster_routing::{
    AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};

use super::acquire::{AcquireReply, Keyset, decode_acquire};
use super::connection::Link;
use super::layout::slot_tags;
use super::{RedisProvider, not_replicated, scripts, unexpected};
use crate::error::{BackendError, BackendErrorKind, LockError};

/// One hash slot's share of a request.
pub(super) struct Group {
    pub(super) slot: u16,
    /// Where its keys sit in the request.
    pub(super) positions: Vec<usize>,
    /// Its keys, with the owner's index of this slot.
    pub(super) keys: Keyset,
}

impl RedisProvider {
    /// On a cluster with notifications: joins the slots of `keys` for a
    /// waiting call (subscribing to their channels) until the guard drops.
    pub(super) async fn join_slots(
        &self,
        keys: &Keyset,
        wait: crate::provider::Wait,
    ) -> Option<super::shards::Joined> {
        let shards = self.inner.shards.get()?;
        let slots = keys.groups.iter().map(|g| g.slot).collect();
        let deadline = match wait {
            crate::provider::Wait::Until(at) => Some(at),
            _ => None,
        };
        Some(shards.join(slots, deadline).await)
    }

    /// Whether this provider talks to a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        self.inner.conns.is_cluster()
    }

    /// The positions of `lock_keys` grouped by hash slot, in slot order.
    pub(super) fn slot_groups(&self, lock_keys: &[String]) -> Vec<(u16, Vec<usize>)> {
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        let mut slots: Vec<(u16, usize)> = lock_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (self.inner.layout.slot_of(k), i))
            .collect();
        slots.sort_unstable();
        for (slot, i) in slots {
            match groups.last_mut() {
                Some((s, positions)) if *s == slot => positions.push(i),
                _ => groups.push((slot, vec![i])),
            }
        }
        groups
    }

    /// One acquisition attempt over several slots; see the module docs.
    /// `args` are `acquire.lua`'s, with `args[0]` replaced per slot.
    pub(super) async fn attempt_grouped(
        &self,
        keys: &Keyset,
        args: &[&str],
        owner: &str,
        nonce: &str,
    ) -> Result<AcquireReply, LockError> {
        let several = keys.groups.len() > 1;
        let mut tokens = vec![0; keys.n];
        let mut reentered = vec![false; keys.n];
        for (g, group) in keys.groups.iter().enumerate() {
            let n = group.keys.n.to_string();
            let prefix = self.channel_prefix_for(&group.keys.all[0]);
            let mut group_args = args.to_vec();
            group_args[0] = &n;
            // ARGV[10]: the channel prefix of this slot.
            group_args[9] = &prefix;
            // ARGV[12]: over several slots, a re-entered lock's lease is
            // only renewed once every slot said yes (below): a later slot
            // may refuse, and the give-back by nonce leaves re-entered
            // locks alone.
            if several {
                group_args[11] = "1";
            }
            let reply = if self.inner.replicas.0 > 0 {
                self.acquire_acknowledged(&group.keys.all, &group_args)
                    .await
            } else {
                self.eval("acquire", &scripts::ACQUIRE, &group.keys.all, &group_args)
                    .await
            }
            .and_then(|v| decode_acquire(v, group.keys.n));
            let result = match reply {
                Ok(AcquireReply::Acquired {
                    tokens: t,
                    reentered: r,
                }) => {
                    for (i, &p) in group.positions.iter().enumerate() {
                        tokens[p] = t[i];
                        reentered[p] = r[i];
                    }
                    continue;
                }
                Ok(AcquireReply::Held { index, pttl }) => {
                    self.give_back(keys, &keys.groups[..g], owner, nonce).await;
                    Ok(AcquireReply::Held {
                        index: group.positions[index],
                        pttl,
                    })
                }
                Ok(AcquireReply::Foreign { index }) => {
                    self.give_back(keys, &keys.groups[..g], owner, nonce).await;
                    Ok(AcquireReply::Foreign {
                        index: group.positions[index],
                    })
                }
                // Any error may follow a try that ran (redis-rs retries by
                // itself), and a late script may land after the give-back:
                // this slot is given back too, and the call's undo guard
                // gives everything back again by nonce unless it ends
                // holding the locks.
                Err(e) => {
                    self.give_back(keys, &keys.groups[..=g], owner, nonce).await;
                    keys.uncertain
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    Err(e)
                }
            };
            return result;
        }
        // Every slot said yes: re-entered locks now get the new lease (as
        // the one script on a single server would have given them).
        let renewed: Vec<usize> = (0..keys.n).filter(|&p| reentered[p]).collect();
        let ttl = args[3];
        if several && ttl != "0" && !renewed.is_empty() {
            let locks: Vec<String> = renewed.iter().map(|&p| keys.locks()[p].clone()).collect();
            let outcome = self.extend_grouped(&locks, Some(owner), ttl).await;
            if !matches!(outcome, Ok(None)) {
                self.give_back(keys, &keys.groups, owner, nonce).await;
            }
            match outcome {
                Ok(None) => {}
                // Its lease ran out meanwhile: it is free (or someone
                // else's); try again.
                Ok(Some(i)) => {
                    return Ok(AcquireReply::Held {
                        index: renewed[i],
                        pttl: 0,
                    });
                }
                Err(e) => {
                    keys.uncertain
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(AcquireReply::Acquired { tokens, reentered })
    }

    /// Releases by nonce what this attempt took in `groups`; if that fails,
    /// the call's undo guard does it when the call ends without the locks.
    async fn give_back(&self, keys: &Keyset, groups: &[Group], owner: &str, nonce: &str) {
        let undo: Vec<String> = groups
            .iter()
            .flat_map(|g| g.keys.locks().iter().cloned())
            .collect();
        if undo.is_empty() {
            return;
        }
        if let Err(e) = self.release_keys(&undo, owner, nonce, None).await {
            tracing::debug!("giving back a partial acquisition failed: {e}");
            keys.uncertain
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// `acquire.lua` followed by `WAIT` for the replicas, as one pipeline:
    /// the cluster connection sends a pipeline to one node and moves it
    /// whole on a redirection, so the `WAIT` always follows the script on
    /// the master that ran it (a `WAIT` routed on its own could reach the
    /// slot's old master after a failover). The script's reply, or
    /// `NotReplicated` when it took the locks and too few replicas
    /// acknowledged them (the caller gives them back).
    ///
    /// Cost: Redis serves a connection's commands in order, so a `WAIT`
    /// holds up the calls queued behind it on the node's one connection for
    /// a replica round trip. On one server lockstep takes a pooled
    /// connection for this instead; the cluster connection has no pool.
    async fn acquire_acknowledged(
        &self,
        keys: &[String],
        args: &[&str],
    ) -> Result<Value, LockError> {
        let (required, wait) = self.inner.replicas;
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(scripts::ACQUIRE.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        pipe.cmd("WAIT").arg(required).arg(wait.as_millis() as u64);
        let limit = self.inner.response_timeout + wait;
        let (reply, acked) = self
            .inner
            .conns
            .run_within("acquire", limit, |mut conn| async move {
                match pipe.query_async::<(Value, i64)>(&mut conn).await {
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        // A restarted or promoted master: load, then again.
                        scripts::ACQUIRE.load_async(&mut conn).await?;
                        pipe.query_async(&mut conn).await
                    }
                    other => other,
                }
            })
            .await?;
        let granted =
            matches!(&reply, Value::Array(items) if items.first() == Some(&Value::Int(1)));
        if granted && (acked as usize) < required {
            return Err(not_replicated(acked, required, wait));
        }
        Ok(reply)
    }

    /// [`release_keys`](Self::release_keys) on a cluster: every slot at
    /// once, each with its share of the owner's index.
    pub(super) async fn release_grouped(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
    ) -> Result<Vec<bool>, LockError> {
        let groups = self.slot_groups(lock_keys);
        let calls = groups.iter().map(|(slot, positions)| {
            let keys: Vec<String> = positions.iter().map(|&p| lock_keys[p].clone()).collect();
            let index =
                (!owner.is_empty()).then(|| self.inner.layout.slot_owner_index(owner, *slot));
            async move {
                self.release_script(&keys, index, owner, nonce, None)
                    .await
                    .map(|(released, _)| released)
            }
        });
        let mut released = vec![false; lock_keys.len()];
        for ((_, positions), result) in groups.iter().zip(join_all(calls).await) {
            for (flag, &p) in result?.into_iter().zip(positions) {
                released[p] = flag;
            }
        }
        Ok(released)
    }

    /// `extend.lua` on a cluster, every slot at once: `Ok(None)` when every
    /// lock was extended, else the position of the first (in the request's
    /// order) that a slot reported not held.
    pub(super) async fn extend_grouped(
        &self,
        lock_keys: &[String],
        owner: Option<&str>,
        ttl: &str,
    ) -> Result<Option<usize>, LockError> {
        let groups = self.slot_groups(lock_keys);
        let calls = groups.iter().map(|(slot, positions)| {
            let mut keys: Vec<String> = positions.iter().map(|&p| lock_keys[p].clone()).collect();
            if let Some(o) = owner {
                keys.push(self.inner.layout.slot_owner_index(o, *slot));
            }
            let count = positions.len().to_string();
            async move {
                let reply = self
                    .eval(
                        "extend",
                        &scripts::EXTEND,
                        &keys,
                        &[&count, owner.unwrap_or(""), ttl],
                    )
                    .await?;
                redis::from_redis_value::<i64>(reply).map_err(|e| unexpected("extend", e))
            }
        });
        let mut lost = None;
        for ((_, positions), result) in groups.iter().zip(join_all(calls).await) {
            match result? {
                0 => {}
                i if i >= 1 && (i as usize) <= positions.len() => {
                    // Report the first in the request's order, as one script would.
                    let p = positions[i as usize - 1];
                    lost = Some(lost.map_or(p, |l: usize| l.min(p)));
                }
                other => return Err(unexpected("extend", format!("index {other}"))),
            }
        }
        Ok(lost)
    }

    /// `release_all` on a cluster: `release_all.lua` on every master, in
    /// slots mode for an owner, namespace mode otherwise; the counts summed.
    pub(super) async fn release_all_cluster(&self, owner: Option<&str>) -> Result<u64, LockError> {
        let layout = &self.inner.layout;
        let claim = self.inner.claim_ms.to_string();
        let Some(owner) = owner else {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(scripts::RELEASE_ALL_CLUSTER_SOURCE)
                .arg(0)
                .arg("namespace")
                .arg(layout.namespace())
                .arg(layout.scan_pattern())
                // Queued processes are not told: their channels are per
                // slot, which this script cannot name; they find the locks
                // gone at their next attempt (within the fallback period).
                .arg("");
            let routing = RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::Aggregate(AggregateOp::Sum)),
            ));
            let reply = self.route("release_all", cmd, routing).await?;
            return redis::from_redis_value::<u64>(reply).map_err(|e| unexpected("release_all", e));
        };
        // Each master visits the owner's index of every slot it serves
        // (some 5,000 probes, a few ms of script time); a slot that moved
        // meanwhile is skipped there and retried where it went.
        let (before, after) = layout.slot_owner_index_parts(owner);
        let mut pending: Vec<u16> = (0..slot_tags().len() as u16).collect();
        let mut released = 0;
        for _ in 0..MAX_ROUNDS {
            let masters = self.slot_masters(&pending).await?;
            let calls = masters.into_iter().map(|((host, port), slots)| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(scripts::RELEASE_ALL_CLUSTER_SOURCE)
                    .arg(0)
                    .arg("slots")
                    .arg(owner)
                    .arg(&claim)
                    .arg(if self.inner.waiting.is_some() {
                        "1"
                    } else {
                        ""
                    })
                    .arg(&before)
                    .arg(&after);
                for slot in slots {
                    cmd.arg(&slot_tags()[slot as usize]);
                }
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                self.route("release_all", cmd, routing)
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

    /// The masters serving `slots` (by address), with their share of them.
    async fn slot_masters(
        &self,
        slots: &[u16],
    ) -> Result<Vec<((String, u16), Vec<u16>)>, LockError> {
        let reply = self
            .route(
                "release_all",
                redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        // [[first, last, [host, port, id, ...], replicas...], ...]
        let ranges: Vec<(u16, u16, (String, u16))> = match reply {
            Value::Array(ranges) => ranges
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
                .collect(),
            other => {
                return Err(unexpected(
                    "release_all",
                    format!("CLUSTER SLOTS: {other:?}"),
                ));
            }
        };
        let mut masters: Vec<((String, u16), Vec<u16>)> = Vec::new();
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
            .run(operation, |conn| route(conn, cmd, routing))
            .await
    }
}

async fn route(conn: Link, cmd: redis::Cmd, routing: RoutingInfo) -> redis::RedisResult<Value> {
    match conn {
        Link::Cluster(mut c) => c.route_command(cmd, routing).await,
        Link::Single(mut c) => cmd.query_async::<Value>(&mut c).await,
    }
}

/// How often `release_all` follows slots that moved while it ran.
const MAX_ROUNDS: usize = 5;

/// The slot a tag of [`slot_tags`] stands for.
fn tag_slot(tag: &str) -> Option<u16> {
    slot_tags().iter().position(|t| t == tag).map(|p| p as u16)
}
