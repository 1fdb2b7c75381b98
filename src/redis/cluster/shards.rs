//! Release notifications on a Redis Cluster: sharded pub/sub.
//!
//! On one server each process has one channel. On a cluster a script may
//! only publish to a channel of its own slot (`SPUBLISH`), and a sharded
//! channel lives on its slot's master, so a process has one channel per
//! slot it waits in: `<namespace>{<slot tag>}c:<pid>`, the tag being the
//! slot's (see `layout.rs`). The scripts are the same as on one server;
//! the channel prefix they are given carries the tag, which tells them to
//! use `SPUBLISH` (see `lua/prelude.lua`). `SPUBLISH` counts the listeners
//! on the slot's master, where the waiting processes subscribed, so a
//! process that is not listening is skipped, as on one server.
//!
//! [`Shards`] keeps the subscriptions on a connection of their own (redis-rs's
//! cluster connection, RESP3, pushes to a channel):
//!
//! - a waiting call joins the slots of its keys before its first attempt,
//!   and the call returns only once they are subscribed (so no release
//!   published after the attempt is missed); it leaves them when it ends;
//! - slots nobody waits in are unsubscribed after [`IDLE`], not at once
//!   (a busy lock would otherwise cost a subscribe per wait);
//! - when a slot moves, its master drops the subscription (an unsolicited
//!   `SUNSUBSCRIBE`): it is subscribed again, on the new master, and the
//!   waiters try again at once (messages may have been lost meanwhile);
//! - after a node's connection closes, likewise; and every few seconds any
//!   slot someone waits in that is not subscribed (its master failed, say)
//!   is subscribed again, on the slot's master of the moment. Waiters
//!   never depend on a message: the fallback period and the holder's lease
//!   wake them too.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, timeout};

use crate::redis::layout::{Layout, key_slot, slot_tags};
use crate::redis::waiting::{Waiting, Withdrawal};

/// How long a slot stays subscribed with nobody waiting in it.
const IDLE: Duration = Duration::from_secs(10);

/// How often idle slots are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One slot's subscription.
#[derive(Debug, Default)]
struct Slot {
    /// Waiting calls in this slot.
    users: usize,
    /// Whether the subscription is confirmed.
    subscribed: bool,
    /// Since when nobody waits in it.
    idle_since: Option<Instant>,
}

/// The sharded subscriptions of one provider.
pub(crate) struct Shards {
    client: ClusterClient,
    /// The subscription connection, made on first use (kept: redis-rs
    /// reconnects its nodes and resubscribes on its own).
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    /// A sweep or repair is running (they run in tasks of their own, so
    /// that messages keep being delivered meanwhile).
    maintaining: std::sync::atomic::AtomicBool,
    slots: Mutex<HashMap<u16, Slot>>,
    /// Channels are `<namespace>{<tag>}c:<pid>`.
    namespace: String,
    pid: String,
    connect_timeout: Duration,
}

impl Shards {
    /// `client` must speak RESP3 and push to the receiver given to
    /// [`run`].
    pub(crate) fn new(
        client: ClusterClient,
        layout: &Layout,
        waiting: &Waiting,
        connect_timeout: Duration,
    ) -> Arc<Shards> {
        Arc::new(Shards {
            client,
            conn: tokio::sync::Mutex::new(None),
            maintaining: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::default(),
            namespace: layout.namespace().to_owned(),
            pid: waiting.pid.clone(),
            connect_timeout,
        })
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<u16, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel prefix of `slot` (what the scripts are given).
    pub(crate) fn prefix(&self, slot: u16) -> String {
        format!("{}{{{}}}c:", self.namespace, slot_tags()[slot as usize])
    }

    fn channel(&self, slot: u16) -> String {
        format!("{}{}", self.prefix(slot), self.pid)
    }

    /// The slot a channel of ours belongs to.
    fn slot_of_channel(&self, channel: &str) -> Option<u16> {
        let rest = channel.strip_prefix(&self.namespace)?.strip_prefix('{')?;
        let (tag, _) = rest.split_once('}')?;
        Some(key_slot(tag.as_bytes()))
    }

    /// Counts one more waiting call in `slots`; to be matched by a
    /// [`leave`](Self::leave) (see [`Joined`]).
    fn enter(&self, slots: &[u16]) {
        let mut map = self.slots();
        for s in slots {
            let slot = map.entry(*s).or_default();
            slot.users += 1;
            slot.idle_since = None;
        }
    }

    /// Joins `slots` for one waiting call, until the returned guard is
    /// dropped, and subscribes those not yet subscribed. Returns once they
    /// are, or subscribing failed, or `deadline` passed (the call's own):
    /// the waiters then hear nothing in those slots until the repair
    /// subscribes them, and try again at their fallback period meanwhile.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the slots again; a subscribe it had under
    /// way counts once the repair confirms it.
    pub(crate) async fn join(
        self: &Arc<Self>,
        slots: Vec<u16>,
        deadline: Option<Instant>,
    ) -> Joined {
        self.enter(&slots);
        let joined = Joined {
            shards: Arc::clone(self),
            slots,
        };
        if !self.all_subscribed(&joined.slots) {
            let subscribe = self.subscribe(&joined.slots, false);
            match deadline {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, subscribe).await;
                }
                None => {
                    subscribe.await;
                }
            }
        }
        joined
    }

    /// Whether all of `slots` are subscribed (checked without waiting for
    /// a subscribe under way).
    fn all_subscribed(&self, slots: &[u16]) -> bool {
        let map = self.slots();
        slots
            .iter()
            .all(|s| map.get(s).is_some_and(|slot| slot.subscribed))
    }

    /// Subscribes those of `slots` that are not subscribed yet (all of them
    /// with `again`: their master dropped them). Returns whether all of
    /// them are now.
    async fn subscribe(&self, slots: &[u16], again: bool) -> bool {
        // One subscriber at a time: a subscribe must not overtake the
        // unsubscribe of the same slot by the sweep, and a dropped
        // subscription must not be marked subscribed by a subscribe that
        // was under way when it was dropped.
        let mut conn = self.conn.lock().await;
        let missing: Vec<u16> = {
            let mut map = self.slots();
            if again {
                for s in slots {
                    if let Some(slot) = map.get_mut(s) {
                        slot.subscribed = false;
                    }
                }
            }
            slots
                .iter()
                .copied()
                .filter(|s| map.get(s).is_some_and(|slot| !slot.subscribed))
                .collect()
        };
        if missing.is_empty() {
            return true;
        }
        let Some(c) = self.connection(&mut conn).await else {
            return false;
        };
        let channels: Vec<String> = missing.iter().map(|s| self.channel(*s)).collect();
        // One SSUBSCRIBE per slot: the command may only name channels of
        // one slot.
        for (slot, channel) in missing.iter().zip(&channels) {
            match timeout(self.connect_timeout, c.ssubscribe(channel)).await {
                Ok(Ok(())) => {
                    if let Some(s) = self.slots().get_mut(slot) {
                        s.subscribed = true;
                    }
                }
                failed => {
                    // The connection stays: dropping it would silently drop
                    // every other slot's subscription with it (redis-rs
                    // reconnects its nodes itself). The repair tries this
                    // slot again.
                    tracing::debug!("subscribing to {channel} failed: {failed:?}");
                    return false;
                }
            }
        }
        true
    }

    /// Ends one waiting call's use of `slots`.
    fn leave(&self, slots: &[u16]) {
        let mut map = self.slots();
        for s in slots {
            if let Some(slot) = map.get_mut(s) {
                slot.users = slot.users.saturating_sub(1);
                if slot.users == 0 {
                    slot.idle_since = Some(Instant::now());
                }
            }
        }
    }

    /// The subscription connection, connecting if there is none.
    async fn connection<'c>(
        &self,
        conn: &'c mut Option<ClusterConnection>,
    ) -> Option<&'c mut ClusterConnection> {
        if conn.is_none() {
            match timeout(self.connect_timeout, self.client.get_async_connection()).await {
                Ok(Ok(c)) => *conn = Some(c),
                Ok(Err(e)) => {
                    tracing::debug!("the notification connection failed: {e}");
                    return None;
                }
                Err(_) => {
                    tracing::debug!("the notification connection timed out");
                    return None;
                }
            }
        }
        conn.as_mut()
    }

    /// Subscribes again every slot someone waits in that is not (or may
    /// not be) subscribed: after a disconnection, and on every sweep, so
    /// that a subscription lost with a failed master comes back on the
    /// promoted one. Returns whether any was.
    async fn repair(&self, again: bool) -> bool {
        let wanted: Vec<u16> = self
            .slots()
            .iter()
            .filter(|(_, s)| s.users > 0 && (again || !s.subscribed))
            .map(|(slot, _)| *slot)
            .collect();
        if wanted.is_empty() {
            return false;
        }
        self.subscribe(&wanted, again).await;
        true
    }

    /// Unsubscribes the slots idle for [`IDLE`].
    async fn sweep(&self) {
        let mut conn = self.conn.lock().await;
        let idle: Vec<u16> = {
            let mut map = self.slots();
            let idle: Vec<u16> = map
                .iter()
                .filter(|(_, s)| s.users == 0 && s.idle_since.is_some_and(|t| t.elapsed() >= IDLE))
                .map(|(slot, _)| *slot)
                .collect();
            for slot in &idle {
                map.remove(slot);
            }
            idle
        };
        if idle.is_empty() {
            return;
        }
        if let Some(c) = conn.as_mut() {
            for slot in idle {
                let _ = timeout(self.connect_timeout, c.sunsubscribe(self.channel(slot))).await;
            }
        }
    }

    /// A slot's master dropped our subscription (the slot moved): it is
    /// marked so at once, whether or not anyone waits in it now (a waiter
    /// joining later must subscribe again). Returns whether anyone waits in
    /// it, so that it should be subscribed again. (The reply to the sweep's
    /// own unsubscribe comes here too, for a slot already forgotten.)
    fn dropped(&self, slot: u16) -> bool {
        match self.slots().get_mut(&slot) {
            Some(s) => {
                s.subscribed = false;
                s.users > 0
            }
            None => false,
        }
    }

    /// The periodic maintenance, in a task of its own unless one runs:
    /// idle slots unsubscribed, wanted ones subscribed again.
    fn maintain(self: &Arc<Self>, waiting: &Arc<Waiting>) {
        if self.maintaining.swap(true, Ordering::AcqRel) {
            return;
        }
        let (shards, waiting) = (Arc::clone(self), Arc::clone(waiting));
        tokio::spawn(async move {
            shards.sweep().await;
            if shards.repair(false).await {
                waiting.wake_all();
            }
            shards.maintaining.store(false, Ordering::Release);
        });
    }
}

/// One waiting call's slots, left when dropped.
pub(crate) struct Joined {
    shards: Arc<Shards>,
    slots: Vec<u16>,
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.shards.leave(&self.slots);
    }
}

/// Reads the subscription connection's pushes: dispatches messages to the
/// waiters, follows dropped subscriptions, and sweeps idle slots, until the
/// provider is gone or `waiting.stop` fires. `withdraw` is called with a
/// lock reserved for this process that nobody here wants.
pub(crate) async fn run(
    shards: Weak<Shards>,
    waiting: Arc<Waiting>,
    mut pushes: UnboundedReceiver<PushInfo>,
    withdraw: impl Fn(String, Arc<Withdrawal>) + Send + 'static,
) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        let push = tokio::select! {
            push = pushes.recv() => push,
            _ = sweep.tick() => {
                let Some(shards) = shards.upgrade() else { return };
                shards.maintain(&waiting);
                continue;
            }
            _ = waiting.stop.cancelled() => return,
        };
        let Some(push) = push else { return };
        let Some(s) = shards.upgrade() else { return };
        match push.kind {
            PushKind::SMessage => {
                if let Some(Value::BulkString(payload)) = push.data.get(1)
                    && let Ok(text) = std::str::from_utf8(payload)
                    && let Some((key, ticket)) = waiting.dispatch(text)
                {
                    withdraw(key, ticket);
                }
            }
            PushKind::SUnsubscribe => {
                let slot = match push.data.first() {
                    Some(Value::BulkString(channel)) => std::str::from_utf8(channel)
                        .ok()
                        .and_then(|c| s.slot_of_channel(c)),
                    _ => None,
                };
                if let Some(slot) = slot
                    && s.dropped(slot)
                {
                    let waiting = Arc::clone(&waiting);
                    tokio::spawn(async move {
                        s.subscribe(&[slot], true).await;
                        // Messages may have been lost while it moved.
                        waiting.wake_all();
                    });
                }
            }
            PushKind::Disconnection => {
                // A node's connection closed: its subscriptions may be gone
                // (redis-rs subscribes again once it reconnects; so do we,
                // a repeated subscribe is harmless), and messages lost.
                let waiting = Arc::clone(&waiting);
                tokio::spawn(async move {
                    s.repair(true).await;
                    waiting.wake_all();
                });
            }
            _ => {}
        }
    }
}
