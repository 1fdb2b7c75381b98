//! The provider's local waiters, per key, and the withdrawal of its queue
//! entries when the last of them leaves.
//!
//! The server's queue (`<schema>.queue`) holds at most one entry per
//! provider, key and kind. Behind that entry the provider's own waiters
//! for the key wait here, in arrival order: a release reserves the lock for
//! the provider and tells it (`r<key>` on its channel, or the release's
//! reply when it is the releasing provider), and the first local
//! single-key waiter claims it. Multi-key waiters queue a wake-only entry
//! (`w<key>`) and retry when told.
//!
//! When the last local waiter of a key leaves without taking the lock
//! (timed out, failed, dropped), the provider's entry and any reservation
//! for it must go: a background *withdrawal* (one statement) does that. A
//! waiter that joins before it is sent calls it off (the entry serves the
//! newcomer); one that joins after it was sent waits for it to finish, or
//! the withdrawal could remove the entry the newcomer's attempt relied on.
//!
//! Each key also carries this provider's mark on it, if any: the gate of
//! its multi-key waiters (`crate::gate`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Inner;
use super::handoff::{self, HandoffRequest, HandoffState};
use crate::gate::{self, Gate, Mark};

/// One waiting call, as its keys' local queues know it.
#[derive(Debug)]
pub(crate) struct Waiter {
    /// Woken (with a stored permit) when it is its turn, or it should retry.
    pub(crate) notify: Notify,
    /// What a direct hand-off takes the lock with (single-key waiters).
    pub(crate) request: Option<HandoffRequest>,
    /// Offers in flight and locks handed to it (`handoff.rs`).
    pub(crate) handoff: Mutex<HandoffState>,
}

/// A withdrawal of the provider's entries for a key, from when the last
/// local waiter left until the server answered.
#[derive(Debug, Default)]
pub(crate) struct Withdrawal {
    /// Called off before it was sent.
    cancelled: AtomicBool,
    done: Notify,
    finished: AtomicBool,
}

impl Withdrawal {
    fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.done.notify_waiters();
    }

    /// Waits until it finished (bounded by `within`).
    pub(crate) async fn finished(&self, within: Duration) {
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if !self.finished.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(within, done).await;
        }
    }
}

/// The local waiters of one key.
#[derive(Debug, Default)]
pub(crate) struct KeyWaiters {
    /// Single-key waiters, in arrival order: the first claims reservations.
    pub(crate) singles: VecDeque<Arc<Waiter>>,
    /// Multi-key waiters that wait for this key among others.
    others: Vec<Arc<Waiter>>,
    /// Whether the server may hold an entry or a reservation of this
    /// provider for the key (an attempt that could queue was sent, or a
    /// reservation was announced) that nobody here will use up.
    queued: bool,
    /// A withdrawal under way, and whether it was sent.
    withdrawal: Option<(Arc<Withdrawal>, bool)>,
    /// This provider's mark on the key.
    mark: Option<Mark>,
}

impl KeyWaiters {
    fn is_idle(&self) -> bool {
        self.singles.is_empty()
            && self.others.is_empty()
            && self.withdrawal.is_none()
            && self.mark.is_none()
    }

    /// Clears the mark and wakes the multi-key waiters (the gate opened).
    fn unmark(&mut self) {
        self.mark = None;
        for w in &self.others {
            w.notify.notify_one();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.singles.len() + self.others.len()
    }

    /// Whether a call of this provider waits for the key (or attempts it).
    pub(crate) fn is_waited(&self) -> bool {
        self.len() > 0 || self.mark.as_ref().is_some_and(|m| !m.is_held_by(None))
    }
}

/// A waiting call's place in its keys' local queues. Leaves them when
/// dropped, however the call ends.
pub(crate) struct Registration<'a> {
    inner: &'a Arc<Inner>,
    keys: &'a [String],
    single: bool,
    pub(crate) waiter: Arc<Waiter>,
    /// The call took its locks, and its last attempt left nothing of this
    /// provider's queued that nobody will use (see `took`).
    took: bool,
    /// The call took its locks.
    succeeded: bool,
    /// Its keys carry its attempt's mark.
    attempting: bool,
    /// The attempt under way, if any.
    in_flight: Option<QueueArgs>,
}

/// What an attempt tells the server about this provider's queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueArgs {
    /// The entry's kind: a handoff entry (a single-key call) or wake only.
    pub(crate) handoff: bool,
    /// Queue on conflict; not while the LISTEN connection is down (the
    /// provider would not hear its turn).
    pub(crate) queue: bool,
    /// The caller is the first local single-key waiter: it claims a
    /// reservation for the provider.
    pub(crate) claim: bool,
    /// More local waiters of the caller's kind wait for its keys: on
    /// success the provider's entry stays (a handoff entry moves to the
    /// back: round robin between providers).
    pub(crate) more: bool,
}

impl Inner {
    /// Joins the local queues of `keys` (a single-key call joins its key's
    /// line of single waiters). Returns the withdrawals of these keys that
    /// were already sent: the caller waits for them before its first
    /// attempt (the registration, made first, cleans up if it is dropped).
    pub(crate) fn register<'a>(
        self: &'a Arc<Self>,
        keys: &'a [String],
        request: HandoffRequest,
    ) -> (Registration<'a>, Vec<Arc<Withdrawal>>) {
        let single = keys.len() == 1;
        let waiter = Arc::new(Waiter {
            notify: Notify::new(),
            request: single.then_some(request),
            handoff: handoff::state(),
        });
        let mut pending = Vec::new();
        let mut waiters = self.waiters();
        for key in keys {
            let state = waiters.entry(key.clone()).or_default();
            match state.withdrawal.take() {
                Some((w, true)) => {
                    pending.push(Arc::clone(&w));
                    state.withdrawal = Some((w, true));
                }
                Some((w, false)) => {
                    w.cancelled.store(true, Ordering::Release);
                    w.finish();
                    // Its entry (or reservation) now serves the newcomer.
                    state.queued = true;
                }
                None => {}
            }
            if single {
                state.singles.push_back(Arc::clone(&waiter));
            } else {
                state.others.push(Arc::clone(&waiter));
            }
        }
        let registration = Registration {
            inner: self,
            keys,
            single,
            waiter,
            took: false,
            succeeded: false,
            attempting: false,
            in_flight: None,
        };
        (registration, pending)
    }

    /// Wakes this provider's waiters of `key` for a message from its
    /// channel: `reserved` (the lock was reserved for this provider) wakes
    /// the first single-key waiter, or, when there is none, withdraws (the
    /// lock goes on to the next in the queue); a wake-up wakes every
    /// multi-key waiter.
    pub(crate) fn wake(self: &Arc<Self>, key: &str, reserved: bool) {
        let mut waiters = self.waiters();
        if reserved {
            let state = waiters.entry(key.to_owned()).or_default();
            state.queued = true;
            if let Some(first) = state.singles.front() {
                first.notify.notify_one();
            } else if let Some(w) = self.start_withdrawal(state, true) {
                drop(waiters);
                self.spawn_withdrawal(key.to_owned(), w);
            }
        } else if let Some(state) = waiters.get(key) {
            for w in &state.others {
                w.notify.notify_one();
            }
        }
    }

    /// Marks `keys` as held here by `owner` until `until` (a lock one of
    /// this provider's calls took).
    pub(crate) fn mark_held(&self, keys: &[String], owner: Option<&str>, until: Option<Instant>) {
        let mut waiters = self.waiters();
        for key in keys {
            let state = waiters.entry(key.clone()).or_default();
            state.mark = Some(Mark::held(owner, until));
        }
    }

    /// `key`'s lock, held here, was released (or freed): the gate opens.
    pub(crate) fn unmark_held(&self, keys: impl IntoIterator<Item = impl AsRef<str>>) {
        let mut waiters = self.waiters();
        for key in keys {
            let key = key.as_ref();
            if let Some(state) = waiters.get_mut(key)
                && state.mark.as_ref().is_some_and(|m| m.is_held_by(None))
            {
                state.unmark();
                if state.is_idle() {
                    waiters.remove(key);
                }
            }
        }
    }

    /// Every lock held here by `owner` (`None`: every lock) was released.
    pub(crate) fn unmark_owner(&self, owner: Option<&str>) {
        self.unmark_where(|mark| mark.is_held_by(owner.map(Some)));
    }

    /// Drops the marks of leases that ended (locks taken here and never
    /// released through this provider).
    pub(crate) fn purge_marks(&self) {
        let now = Instant::now();
        self.unmark_where(|mark| mark.is_stale(now));
    }

    fn unmark_where(&self, pred: impl Fn(&Mark) -> bool) {
        self.waiters().retain(|_, state| {
            if state.mark.as_ref().is_some_and(&pred) {
                state.unmark();
            }
            !state.is_idle()
        });
    }

    /// Wakes every waiter (the LISTEN connection came back, or shutdown).
    pub(crate) fn wake_all(&self) {
        for state in self.waiters().values() {
            for w in state.singles.iter().chain(&state.others) {
                w.notify.notify_one();
            }
        }
    }

    /// How many of this provider's calls wait for `key`.
    pub(crate) fn local_waiters(&self, key: &str) -> u64 {
        self.waiters().get(key).map_or(0, |s| s.len() as u64)
    }

    /// The withdrawal to make for `state` once its last single-key waiter
    /// left, if the server may hold an entry or reservation of this
    /// provider: when no multi-key waiter is left either, or (`reserved`)
    /// a reservation nobody here will claim is waiting.
    fn start_withdrawal(&self, state: &mut KeyWaiters, reserved: bool) -> Option<Arc<Withdrawal>> {
        if !state.singles.is_empty()
            || (!state.others.is_empty() && !reserved)
            || state.withdrawal.is_some()
            || !state.queued
        {
            return None;
        }
        state.queued = false;
        let w = Arc::new(Withdrawal::default());
        state.withdrawal = Some((Arc::clone(&w), false));
        Some(w)
    }

    fn spawn_withdrawal(self: &Arc<Self>, key: String, w: Arc<Withdrawal>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Dropped outside a runtime: the entry and any reservation run
            // out by themselves.
            let mut waiters = self.waiters();
            if let Some(state) = waiters.get_mut(&key) {
                state.withdrawal = None;
                if state.is_idle() {
                    waiters.remove(&key);
                }
            }
            w.finish();
            return;
        };
        let inner = Arc::clone(self);
        let pending = inner.pending();
        runtime.spawn(async move {
            {
                let mut waiters = inner.waiters();
                if w.cancelled.load(Ordering::Acquire) {
                    return;
                }
                if let Some(state) = waiters.get_mut(&key) {
                    state.withdrawal = Some((Arc::clone(&w), true));
                }
            }
            inner.withdraw(&key).await;
            {
                let mut waiters = inner.waiters();
                if let Some(state) = waiters.get_mut(&key) {
                    if state
                        .withdrawal
                        .as_ref()
                        .is_some_and(|(x, _)| Arc::ptr_eq(x, &w))
                    {
                        state.withdrawal = None;
                    }
                    if state.is_idle() {
                        waiters.remove(&key);
                    }
                }
            }
            w.finish();
            drop(pending);
        });
    }
}

impl Registration<'_> {
    /// What the next attempt tells the server. Until
    /// [`end_attempt`](Self::end_attempt) it is in flight: dropped then,
    /// the keys count as possibly queued.
    pub(crate) fn queue_args(&mut self, listening: bool) -> QueueArgs {
        let waiters = self.inner.waiters();
        let mut args = QueueArgs {
            handoff: self.single,
            queue: listening,
            claim: false,
            more: false,
        };
        if self.single {
            if let Some(state) = waiters.get(&self.keys[0])
                && let Some(first) = state.singles.front()
            {
                args.claim = Arc::ptr_eq(first, &self.waiter);
                args.more = state.singles.len() > 1;
            }
        } else {
            args.more = self
                .keys
                .iter()
                .any(|k| waiters.get(k).is_some_and(|s| s.others.len() > 1));
        }
        self.in_flight = Some(args);
        args
    }

    /// Whether this multi-key call may attempt now: not while another call
    /// of this provider has one of its keys (a lock it holds, unless the
    /// same named owner's, which this call re-enters; or an attempt on its
    /// way). If it may, its keys carry its attempt's mark until
    /// [`end_attempt`](Self::end_attempt) or the registration's drop.
    pub(crate) fn enter(&mut self, owner: Option<&str>) -> Gate {
        let me = Arc::as_ptr(&self.waiter) as usize;
        let mut waiters = self.inner.waiters();
        let marks = self
            .keys
            .iter()
            .map(|k| waiters.get(k).and_then(|s| s.mark.as_ref()));
        let gate = gate::check(marks, me, owner);
        if matches!(gate, Gate::Open) {
            for key in self.keys {
                if let Some(state) = waiters.get_mut(key) {
                    gate::claim(&mut state.mark, me);
                }
            }
            self.attempting = true;
        }
        gate
    }

    /// The attempt ended, `acquired` or not. One that did not succeed (or
    /// whose outcome is unknown) may have queued this provider for the keys
    /// (an attempt that succeeds queues nothing). The marks of an attempt
    /// [`enter`](Self::enter) let through go (a success replaced them with
    /// the lock's).
    pub(crate) fn end_attempt(&mut self, acquired: bool) {
        let in_flight = self.in_flight.take();
        let attempting = std::mem::take(&mut self.attempting);
        let queued = !acquired && in_flight.is_some_and(|a| a.queue || a.claim);
        if !queued && !attempting {
            return;
        }
        let me = Arc::as_ptr(&self.waiter) as usize;
        let mut waiters = self.inner.waiters();
        for key in self.keys {
            let Some(state) = waiters.get_mut(key) else {
                continue;
            };
            if queued {
                state.queued = true;
            }
            if attempting && state.mark.as_ref().is_some_and(|m| m.is_attempt_of(me)) {
                state.unmark();
            }
        }
    }

    /// Whether the call may attempt now: a single-key call only while it is
    /// its key's first local waiter (the first speaks for the provider, the
    /// others are served after it), a multi-key call always.
    pub(crate) fn may_attempt(&self) -> bool {
        if !self.single {
            return true;
        }
        self.inner
            .waiters()
            .get(&self.keys[0])
            .and_then(|s| s.singles.front())
            .is_none_or(|first| Arc::ptr_eq(first, &self.waiter))
    }

    /// The call took a lock handed to it: as a claim with `more` (what the
    /// offer told the server) would have.
    pub(crate) fn took_grant(&mut self, more: bool) {
        self.took(QueueArgs {
            handoff: true,
            queue: true,
            claim: true,
            more,
        });
    }

    /// The call took its locks with `args`: without more local waiters of
    /// its kind, the server dropped this provider's entries of that kind.
    pub(crate) fn took(&mut self, args: QueueArgs) {
        self.succeeded = true;
        self.took = !args.more && (args.claim || !args.handoff);
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // Dropped mid-attempt: its outcome is unknown.
        self.end_attempt(false);
        if let Some(nonce) = self.waiter.leave() {
            // A lock handed to it that the call never took up.
            self.inner
                .give_back(self.keys, self.waiter.request.as_ref(), nonce);
        }
        let mut withdrawals = Vec::new();
        {
            let mut waiters = self.inner.waiters();
            for key in self.keys {
                let Some(state) = waiters.get_mut(key) else {
                    continue;
                };
                if self.single {
                    let was_first = state
                        .singles
                        .front()
                        .is_some_and(|w| Arc::ptr_eq(w, &self.waiter));
                    state.singles.retain(|w| !Arc::ptr_eq(w, &self.waiter));
                    // A reservation may be waiting for the next one (unless
                    // this call used it up).
                    if was_first
                        && !self.succeeded
                        && let Some(next) = state.singles.front()
                    {
                        next.notify.notify_one();
                    }
                } else {
                    state.others.retain(|w| !Arc::ptr_eq(w, &self.waiter));
                }
                if self.took && state.singles.is_empty() && state.others.is_empty() {
                    state.queued = false;
                }
                if let Some(w) = self.inner.start_withdrawal(state, false) {
                    withdrawals.push((key.clone(), w));
                } else if state.is_idle() {
                    waiters.remove(key);
                }
            }
        }
        for (key, w) in withdrawals {
            self.inner.spawn_withdrawal(key, w);
        }
    }
}

/// Keeps `Inner`'s count of background work up while it lives.
pub(crate) struct Pending(Arc<Inner>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.undos.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// Releases, in the background, a lock handed to a waiter whose call
    /// ended before it took it up.
    fn give_back(
        self: &Arc<Self>,
        keys: &[String],
        request: Option<&HandoffRequest>,
        nonce: String,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pending = self.pending();
        let (inner, keys, owner) = (
            Arc::clone(self),
            keys.to_vec(),
            request.and_then(|r| r.owner.clone()),
        );
        runtime.spawn(async move {
            inner.undo(None, &keys, owner.as_deref(), &nonce).await;
            drop(pending);
        });
    }

    /// Counts a background task (an undo or a withdrawal) until the guard
    /// drops.
    pub(crate) fn pending(self: &Arc<Self>) -> Pending {
        self.undos.fetch_add(1, Ordering::AcqRel);
        Pending(Arc::clone(self))
    }

    /// Runs the withdrawal statement for `key`, with retries on fresh
    /// connections (bounded).
    async fn withdraw(&self, key: &str) {
        const OP: &str = "withdraw";
        let keys = [key.to_owned()];
        let claim_ms = self.claim_ms();
        for pause in [0, 100, 500] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if self.check_open().is_err() {
                return;
            }
            match self
                .query(OP, &self.sql.withdraw, &[&&keys[..], &self.pid, &claim_ms])
                .await
            {
                Ok(_) => return,
                Err(e) => tracing::debug!(error = %e, "lockstep postgres: withdraw failed"),
            }
        }
    }
}
