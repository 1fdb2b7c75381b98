//! Redis Cluster (feature `cluster`): requests split by hash slot.
//!
//! On a cluster a script may only touch keys of one hash slot. The key
//! layout already keeps a lock, its fencing counter and its wait queue in
//! one slot; an owner's index is split by slot here (`slots.rs`), so each
//! slot's share of a request is one ordinary script call:
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
//! process: see `shards.rs`. `client.rs` builds the cluster clients and
//! starts a provider on them; `release_all.rs` runs `release_all` on every
//! master.

mod client;
mod release_all;
pub(crate) mod shards;
mod slots;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::join_all;
use redis::Value;
use redis::cluster_async::ClusterConnection;
use tokio::time::timeout;

use super::RedisProvider;
use super::error::{RawError, not_replicated};
use super::keyset::Keyset;
use super::layout::Layout;
use super::scripts::acquire::{AcquireArgs, AcquireReply};
use super::scripts::extend::ExtendArgs;
use super::scripts::release::ReleaseArgs;
use super::scripts::{self, ACQUIRE, Arg};
use crate::error::LockError;
use crate::provider::Wait;
use shards::{Joined, Shards};

pub(crate) use client::connect;
pub(crate) use slots::{request_index, slot_index};

/// The cluster side of a provider: its sharded subscriptions, once the
/// provider has started them (with notifications on).
#[derive(Default)]
pub(crate) struct Cluster {
    shards: OnceLock<Arc<Shards>>,
}

impl Cluster {
    /// The channel prefix of `lock_key`'s slot, when notifications are on.
    pub(crate) fn channel_prefix(&self, layout: &Layout, lock_key: &str) -> Option<String> {
        let shards = self.shards.get()?;
        Some(shards.prefix(layout.slot_of(lock_key)))
    }

    /// Joins the slots of `locks` for a waiting call (subscribing to their
    /// channels) until the guard drops; `None` without notifications.
    pub(crate) async fn join(
        &self,
        layout: &Layout,
        locks: &[String],
        wait: Wait,
    ) -> Option<Joined> {
        let shards = self.shards.get()?;
        let slots = slot_groups(layout, locks)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let deadline = match wait {
            Wait::Until(at) => Some(at),
            _ => None,
        };
        Some(shards.join(slots, deadline).await)
    }
}

/// A cluster connection within `limit`.
pub(crate) async fn open(
    client: &redis::cluster::ClusterClient,
    limit: Duration,
) -> Result<ClusterConnection, RawError> {
    match timeout(limit, client.get_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(RawError::Redis(e)),
        Err(_) => Err(RawError::Connect(
            format!("no cluster connection within {limit:?}"),
            None,
        )),
    }
}

/// The positions of `lock_keys` grouped by hash slot, in slot order.
fn slot_groups(layout: &Layout, lock_keys: &[String]) -> Vec<(u16, Vec<usize>)> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    let mut slots: Vec<(u16, usize)> = lock_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (layout.slot_of(k), i))
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

/// One hash slot's share of a request.
struct Group {
    /// Where its keys sit in the request.
    positions: Vec<usize>,
    /// Its keys, with the owner's index of this slot.
    keys: Keyset,
}

impl RedisProvider {
    /// A request's keys split by slot, in slot order.
    fn groups(&self, keys: &Keyset, owner: &str) -> Vec<Group> {
        let layout = &self.inner.layout;
        let locks = keys.locks();
        slot_groups(layout, locks)
            .into_iter()
            .map(|(slot, positions)| {
                let index = keys
                    .indexed
                    .then(|| slots::owner_index_in(layout, owner, slot));
                let group_locks = positions.iter().map(|&p| locks[p].clone()).collect();
                Group {
                    positions,
                    keys: Keyset::new(layout, group_locks, index),
                }
            })
            .collect()
    }

    /// One acquisition attempt over several slots; see the module docs.
    pub(crate) async fn attempt_grouped(
        &self,
        keys: &Keyset,
        args: &AcquireArgs<'_>,
    ) -> Result<AcquireReply, LockError> {
        let groups = self.groups(keys, args.owner);
        let several = groups.len() > 1;
        let mut tokens = vec![0; keys.lock_count];
        let mut reentered = vec![false; keys.lock_count];
        for (g, group) in groups.iter().enumerate() {
            let group_args = AcquireArgs {
                // Over several slots, a re-entered lock's lease is only
                // renewed once every slot said yes (below): a later slot
                // may refuse, and the give-back by nonce leaves re-entered
                // locks alone.
                keep_reentered_lease: several,
                ..*args
            };
            let argv = group_args.argv(group.keys.lock_count);
            let reply = if self.inner.replicas.0 > 0 {
                self.acquire_acknowledged(&group.keys.keys, &argv).await
            } else {
                self.inner
                    .conns
                    .eval("acquire", &ACQUIRE, &group.keys.keys, &argv)
                    .await
            }
            .and_then(|v| AcquireReply::decode(v, group.keys.lock_count));
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
                    self.give_back(keys, &groups[..g], args).await;
                    Ok(AcquireReply::Held {
                        index: group.positions[index],
                        pttl,
                    })
                }
                Ok(AcquireReply::Foreign { index }) => {
                    self.give_back(keys, &groups[..g], args).await;
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
                    self.give_back(keys, &groups[..=g], args).await;
                    keys.set_uncertain();
                    Err(e)
                }
            };
            return result;
        }
        if several
            && args.ttl_ms > 0
            && reentered.contains(&true)
            && let Some(refused) = self
                .renew_reentered(keys, &groups, args, &reentered)
                .await?
        {
            return Ok(refused);
        }
        Ok(AcquireReply::Acquired { tokens, reentered })
    }

    /// Every slot of a request over several said yes: the locks the owner
    /// already held now get the new lease (as the one script on a single
    /// server would have given them). If one of them is gone meanwhile,
    /// everything is given back and the reply says it is held (it is free
    /// or someone else's: try again).
    async fn renew_reentered(
        &self,
        keys: &Keyset,
        groups: &[Group],
        args: &AcquireArgs<'_>,
        reentered: &[bool],
    ) -> Result<Option<AcquireReply>, LockError> {
        let renewed: Vec<usize> = (0..keys.lock_count).filter(|&p| reentered[p]).collect();
        let locks: Vec<String> = renewed.iter().map(|&p| keys.locks()[p].clone()).collect();
        let outcome = self
            .extend_grouped(&locks, Some(args.owner), args.ttl_ms, keys.indexed)
            .await;
        if !matches!(outcome, Ok(None)) {
            self.give_back(keys, groups, args).await;
        }
        match outcome {
            Ok(None) => Ok(None),
            Ok(Some(i)) => Ok(Some(AcquireReply::Held {
                index: renewed[i],
                pttl: 0,
            })),
            Err(e) => {
                keys.set_uncertain();
                Err(e)
            }
        }
    }

    /// Releases by nonce what this attempt took in `groups`; if that fails,
    /// the call's undo guard does it when the call ends without the locks.
    async fn give_back(&self, keys: &Keyset, groups: &[Group], args: &AcquireArgs<'_>) {
        let undo: Vec<String> = groups
            .iter()
            .flat_map(|g| g.keys.locks().iter().cloned())
            .collect();
        if undo.is_empty() {
            return;
        }
        if let Err(e) = self.release_by_nonce(&undo, args.owner, args.nonce).await {
            tracing::debug!("giving back a partial acquisition failed: {e}");
            keys.set_uncertain();
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
        argv: &[Arg<'_>],
    ) -> Result<Value, LockError> {
        let (required, wait) = self.inner.replicas;
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(ACQUIRE.script().get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(argv);
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
                        ACQUIRE.script().load_async(&mut conn).await?;
                        crate::metrics::script_reloaded("acquire");
                        pipe.query_async(&mut conn).await
                    }
                    other => other,
                }
            })
            .await?;
        if AcquireReply::is_granted(&reply) && (acked as usize) < required {
            return Err(not_replicated(acked, required, wait));
        }
        Ok(reply)
    }

    /// A release over several slots: every slot at once, each with its
    /// share of the owner's index.
    pub(crate) async fn release_grouped(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
    ) -> Result<Vec<bool>, LockError> {
        let layout = &self.inner.layout;
        let groups = slot_groups(layout, lock_keys);
        let calls = groups.iter().map(|(slot, positions)| {
            let keys: Vec<String> = positions.iter().map(|&p| lock_keys[p].clone()).collect();
            let index =
                (!owner.is_empty()).then(|| slots::owner_index_in(layout, owner, *slot).permanent);
            async move {
                let prefix = self.channel_prefix_for(&keys[0]);
                self.release_script(&ReleaseArgs {
                    lock_keys: &keys,
                    index: index.as_deref(),
                    owner,
                    nonce,
                    claim_ms: self.inner.claim_ms,
                    channel_prefix: &prefix,
                    successor: None,
                    pid: self.pid(),
                })
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
    pub(crate) async fn extend_grouped(
        &self,
        lock_keys: &[String],
        owner: Option<&str>,
        ttl_ms: u64,
        indexed: bool,
    ) -> Result<Option<usize>, LockError> {
        let layout = &self.inner.layout;
        let groups = slot_groups(layout, lock_keys);
        let calls = groups.iter().map(|(slot, positions)| {
            let keys: Vec<String> = positions.iter().map(|&p| lock_keys[p].clone()).collect();
            let index = owner
                .filter(|_| indexed)
                .map(|o| slots::owner_index_in(layout, o, *slot));
            async move {
                self.extend_script(&ExtendArgs {
                    lock_keys: &keys,
                    index: index.as_ref(),
                    owner: owner.unwrap_or(""),
                    ttl_ms,
                })
                .await
            }
        });
        let mut lost = None;
        for ((_, positions), result) in groups.iter().zip(join_all(calls).await) {
            if let Some(i) = result? {
                // Report the first in the request's order, as one script would.
                let p = positions[i];
                lost = Some(lost.map_or(p, |l: usize| l.min(p)));
            }
        }
        Ok(lost)
    }
}

/// Loads every script on every master (one by one: `SCRIPT LOAD` goes to
/// every node of a cluster, which a pipeline cannot route).
pub(crate) async fn load_scripts(conn: &mut ClusterConnection) -> redis::RedisResult<()> {
    for lua in scripts::all() {
        lua.script().load_async(conn).await?;
    }
    Ok(())
}
