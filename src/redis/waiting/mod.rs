//! Waiting for locks without polling: the process's notification channel and
//! its registry of local waiters.
//!
//! The protocol (the Redis side is in `lua/prelude.lua`):
//!
//! - Each provider (process) has a random `pid` and one subscription, to
//!   `<namespace>c:<pid>`, on a connection of its own.
//! - A single-key waiter that finds its lock held puts its process in the
//!   lock's Redis queue (`<lock key>:q`), at most once per process. Other
//!   local waiters for the same lock queue up **locally**, behind it, without
//!   touching Redis: a thousand local waiters cost one queue entry.
//! - A release hands the lock on. If the releasing process has a local
//!   waiter and no other process is queued before it, the release script
//!   gives the lock straight to that waiter (one round trip serves both).
//!   Otherwise it reserves the lock for the first queued process that hears
//!   its message, and that process's first local waiter claims it with one
//!   acquire call. Processes are served in queue order, and each process's
//!   waiters in arrival order: FIFO across processes, round-robin when a
//!   process has several waiters.
//! - Multi-key waiters (and every waiter in barging mode) queue a wake-only
//!   entry: a release wakes them and they try again.
//! - Nothing relies on a message arriving: a waiter also wakes when the
//!   holder's lease runs out (it knows the PTTL from its last attempt), at a
//!   fallback period, and after the subscription reconnects, each costing
//!   one acquire call per waiting process and lock. A process whose
//!   subscription is down hears nothing, so the release scripts skip it
//!   instead of reserving locks for it.

pub(crate) mod subscription;
mod waiter;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gate::{self, Gate, Mark};

pub(crate) use waiter::{Waiter, Withdrawal};

/// The local waiters of one lock.
#[derive(Debug, Default)]
struct KeyWaiters {
    /// Single-key waiters, in arrival order. The first one speaks for the
    /// process in Redis.
    singles: VecDeque<Arc<Waiter>>,
    /// Multi-key (or barging) waiters that found this lock held.
    others: Vec<Arc<Waiter>>,
    /// A withdraw of this process's queue entry, from when the last local
    /// waiter left until Redis answered, and whether it was sent.
    withdrawal: Option<(Arc<Withdrawal>, bool)>,
    /// This process's mark on the lock: the gate of its multi-key waiters
    /// (`crate::gate`).
    mark: Option<Mark>,
}

impl KeyWaiters {
    fn is_idle(&self) -> bool {
        self.is_unused() && self.mark.is_none()
    }

    /// Nobody here waits for the lock, attempts it or withdraws from it
    /// (a lock mark may remain).
    fn is_unused(&self) -> bool {
        self.singles.is_empty()
            && self.others.is_empty()
            && self.withdrawal.is_none()
            && self.mark.as_ref().is_none_or(|m| m.is_held_by(None))
    }

    /// Clears the mark and wakes the waiters that wait to be woken (the
    /// gate opened).
    fn unmark(&mut self) {
        self.mark = None;
        for o in &self.others {
            o.wake();
        }
    }

    /// A waiter joins: a withdraw not sent yet is called off (the entry it
    /// would remove serves the newcomer); one already sent must be waited
    /// for, or it could remove the entry the newcomer's attempt relies on.
    fn joined(&mut self) -> Option<Arc<Withdrawal>> {
        match self.withdrawal.take() {
            Some((w, true)) => {
                self.withdrawal = Some((Arc::clone(&w), true));
                Some(w)
            }
            Some((w, false)) => {
                w.finish();
                None
            }
            None => None,
        }
    }

    /// The last waiter of a kind left: a withdraw is to be made (unless one
    /// is under way already).
    fn withdraw(&mut self) -> Option<Arc<Withdrawal>> {
        if self.withdrawal.is_some() {
            return None;
        }
        let w = Arc::new(Withdrawal::default());
        self.withdrawal = Some((Arc::clone(&w), false));
        Some(w)
    }
}

/// The least registry size at which stale lock marks are purged.
const PURGE_FLOOR: usize = 1024;

/// Which of this process's queue entries a withdraw removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// `<pid>`: the single-key waiters' (a handoff is reserved for them).
    Handoff,
    /// `~<pid>`: the woken waiters'.
    Wake,
}

/// How a release's handoff to a local waiter ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// The waiter now holds the lock: its token, and when the release was
    /// sent.
    Granted(u64, Instant),
    /// The release answered and the lock went elsewhere (or stayed).
    Refused,
    /// No answer: the release failed or its future was dropped.
    Unknown,
}

/// The registry of local waiters, and the notification channel's state.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// This process's id in queues and channel names.
    pub(crate) pid: String,
    /// Channels are `<channel_prefix><pid>`.
    pub(crate) channel_prefix: String,
    local: Mutex<HashMap<String, KeyWaiters>>,
    /// The registry's size at which lock marks whose lease ended are
    /// dropped next (amortized: locks left to expire leave no mark behind
    /// for long).
    purge_at: AtomicUsize,
    subscribed: AtomicBool,
    /// Stops the subscription task.
    pub(crate) stop: CancellationToken,
}

impl Waiting {
    /// `subscribed`: whether messages can arrive from the start (on a
    /// cluster, where each wait subscribes its slots itself).
    pub(crate) fn new(namespace: &str, subscribed: bool) -> Arc<Waiting> {
        let pid = {
            let mut id = crate::token::random_id();
            id.truncate(16);
            id
        };
        Arc::new(Waiting {
            pid,
            channel_prefix: format!("{namespace}c:"),
            local: Mutex::default(),
            purge_at: AtomicUsize::new(PURGE_FLOOR),
            subscribed: AtomicBool::new(subscribed),
            stop: CancellationToken::new(),
        })
    }

    fn local(&self) -> MutexGuard<'_, HashMap<String, KeyWaiters>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process's channel.
    pub(crate) fn channel(&self) -> String {
        format!("{}{}", self.channel_prefix, self.pid)
    }

    /// Whether messages can arrive now.
    pub(crate) fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Records whether the subscription is up (messages can arrive).
    fn set_subscribed(&self, up: bool) {
        self.subscribed.store(up, Ordering::Release);
    }

    /// Queues a single-key waiter. Returns whether it is the only one (so
    /// it should make an attempt at once; otherwise it waits its turn), and
    /// a withdraw of this process's queue entry that it must wait for
    /// before its first attempt.
    pub(crate) fn join_single(
        &self,
        key: &str,
        w: &Arc<Waiter>,
    ) -> (bool, Option<Arc<Withdrawal>>) {
        let mut local = self.local();
        let k = local.entry(key.to_owned()).or_default();
        k.singles.push_back(Arc::clone(w));
        (k.singles.len() == 1, k.joined())
    }

    /// Whether `w` is the first local single-key waiter of `key`.
    pub(crate) fn is_first(&self, key: &str, w: &Arc<Waiter>) -> bool {
        self.local()
            .get(key)
            .and_then(|k| k.singles.front())
            .is_some_and(|f| Arc::ptr_eq(f, w))
    }

    /// Whether other local single-key waiters wait for `key` besides `w`.
    pub(crate) fn others_waiting(&self, key: &str, w: &Arc<Waiter>) -> bool {
        self.local()
            .get(key)
            .is_some_and(|k| k.singles.iter().any(|o| !Arc::ptr_eq(o, w)))
    }

    /// Removes a single-key waiter. If it was first and others remain, the
    /// next one is woken to make an attempt. If it gave up (`acquired` is
    /// false) and was the last, returns the withdraw of the process's queue
    /// entry to make; a waiter that got the lock leaves the entry to the
    /// script that gave it (popped, or kept for the waiters behind).
    pub(crate) fn leave_single(
        &self,
        key: &str,
        w: &Arc<Waiter>,
        acquired: bool,
    ) -> Option<Arc<Withdrawal>> {
        let mut local = self.local();
        let k = local.get_mut(key)?;
        let was_first = k.singles.front().is_some_and(|f| Arc::ptr_eq(f, w));
        k.singles.retain(|o| !Arc::ptr_eq(o, w));
        if let Some(next) = k.singles.front() {
            if was_first && !acquired {
                // It gave up: the next one takes over the attempts.
                next.wake();
            }
            return None;
        }
        let withdrawal = if acquired { None } else { k.withdraw() };
        if k.is_idle() {
            local.remove(key);
        }
        withdrawal
    }

    /// Registers a waiter that waits to be woken (multi-key, or barging) as
    /// waiting for `key`; returns a withdraw it must wait for before its
    /// first attempt.
    pub(crate) fn join_woken(&self, key: &str, w: &Arc<Waiter>) -> Option<Arc<Withdrawal>> {
        let mut local = self.local();
        let k = local.entry(key.to_owned()).or_default();
        if !k.others.iter().any(|o| Arc::ptr_eq(o, w)) {
            k.others.push(Arc::clone(w));
        }
        k.joined()
    }

    /// Removes a waiter that waits to be woken from `key`. If it was the
    /// last and `enqueued` (its `~<pid>` entry is in the queue), returns
    /// the withdraw to make.
    pub(crate) fn leave_woken(
        &self,
        key: &str,
        w: &Arc<Waiter>,
        enqueued: bool,
    ) -> Option<Arc<Withdrawal>> {
        let mut local = self.local();
        let k = local.get_mut(key)?;
        k.others.retain(|o| !Arc::ptr_eq(o, w));
        let withdrawal = (k.others.is_empty() && enqueued)
            .then(|| k.withdraw())
            .flatten();
        if k.is_idle() {
            local.remove(key);
        }
        withdrawal
    }

    /// A withdraw of `entry` from `key`'s queue is about to be sent:
    /// `None` if it was called off (a waiter joined), else whether it may
    /// pass a reservation for this process on. Only the single-key waiters
    /// claim reservations, so a `~<pid>` withdraw passes one on only when
    /// no single-key waiter of this process wants the lock.
    pub(crate) fn begin_withdraw(
        &self,
        key: &str,
        w: &Arc<Withdrawal>,
        entry: Entry,
    ) -> Option<bool> {
        let mut local = self.local();
        let k = local.get_mut(key)?;
        match &mut k.withdrawal {
            Some((current, sent)) if Arc::ptr_eq(current, w) => {
                *sent = true;
                Some(entry == Entry::Handoff || k.singles.is_empty())
            }
            _ => None,
        }
    }

    /// A withdraw was answered (or failed): waiters that joined meanwhile
    /// may attempt.
    pub(crate) fn end_withdraw(&self, key: &str, w: &Arc<Withdrawal>) {
        let mut local = self.local();
        if let Some(k) = local.get_mut(key)
            && k.withdrawal
                .as_ref()
                .is_some_and(|(c, _)| Arc::ptr_eq(c, w))
        {
            k.withdrawal = None;
            if k.is_idle() {
                local.remove(key);
            }
        }
        w.finish();
    }

    /// Picks the first local single-key waiter of `key` as the successor of
    /// a release, marking it as being handed the lock. Returns it and
    /// whether more local waiters come after it.
    pub(crate) fn successor(&self, key: &str) -> Option<(Arc<Waiter>, bool)> {
        let local = self.local();
        let k = local.get(key)?;
        let first = k.singles.front()?;
        let mut st = first.state();
        if st.gone || st.granted.is_some() || st.handing || st.attempting {
            return None;
        }
        st.handing = true;
        drop(st);
        Some((Arc::clone(first), k.singles.len() > 1))
    }

    /// Ends a handing. Returns true when the successor's call had already
    /// ended and the lock is (or may be) held under its nonce: the caller
    /// must undo by that nonce.
    pub(crate) fn handed(&self, key: &str, w: &Arc<Waiter>, outcome: Handoff) -> bool {
        let mut local = self.local();
        let mut st = w.state();
        st.handing = false;
        let abandoned = st.gone && outcome != Handoff::Refused;
        match outcome {
            Handoff::Granted(token, sent_at) => {
                st.granted = Some((token, sent_at));
                drop(st);
                if let Some(k) = local.get_mut(key) {
                    k.singles.retain(|o| !Arc::ptr_eq(o, w));
                    if k.is_idle() {
                        local.remove(key);
                    }
                }
            }
            Handoff::Unknown => {
                // Its next attempt, with the same nonce, finds out.
                st.unsure = true;
                st.woken = true;
            }
            Handoff::Refused => {}
        }
        w.notify();
        abandoned
    }

    /// Marks a waiter's call as ended. Returns whether the lock is (or may
    /// be) held under its nonce, which the caller must then undo.
    pub(crate) fn mark_gone(&self, w: &Arc<Waiter>) -> bool {
        let mut st = w.state();
        st.gone = true;
        st.granted.is_some() || st.unsure
    }

    /// Handles a message: wakes the first single-key waiter of the lock (for
    /// a reservation) and every other waiter of it. Returns the lock key
    /// and a withdraw to make if the lock was reserved for this process but
    /// nobody here wants it any more, so that the reservation is passed on.
    pub(crate) fn dispatch(&self, message: &str) -> Option<(String, Arc<Withdrawal>)> {
        let (kind, key) = message.split_at_checked(1)?;
        let mut local = self.local();
        let k = match local.get_mut(key) {
            Some(k) => k,
            None if kind == "r" => local.entry(key.to_owned()).or_default(),
            None => return None,
        };
        for o in &k.others {
            o.wake();
        }
        if let Some(first) = k.singles.front() {
            first.wake();
            return None;
        }
        if kind != "r" {
            return None;
        }
        let withdrawal = k.withdraw()?;
        Some((key.to_owned(), withdrawal))
    }

    /// Wakes every waiter that makes attempts: after a reconnect, messages
    /// may have been lost.
    pub(crate) fn wake_all(&self) {
        for k in self.local().values() {
            if let Some(first) = k.singles.front() {
                first.wake();
            }
            for o in &k.others {
                o.wake();
            }
        }
    }

    /// Marks `keys` as held by a call of this process, of `owner`, until
    /// `until`.
    pub(crate) fn mark_held(&self, keys: &[String], owner: Option<&str>, until: Option<Instant>) {
        let mut local = self.local();
        for key in keys {
            local.entry(key.clone()).or_default().mark = Some(Mark::held(owner, until));
        }
        if local.len() >= self.purge_at.load(Ordering::Relaxed) {
            let now = Instant::now();
            local.retain(|_, k| {
                if k.mark.as_ref().is_some_and(|m| m.is_stale(now)) {
                    k.unmark();
                }
                !k.is_idle()
            });
            self.purge_at
                .store((2 * local.len()).max(PURGE_FLOOR), Ordering::Relaxed);
        }
    }

    /// The locks `keys` held here were released (or freed): their gates
    /// open.
    pub(crate) fn unmark_held<'a>(&self, keys: impl IntoIterator<Item = &'a String>) {
        self.unmark_keys(keys, |m| m.is_held_by(None));
    }

    /// Clears the marks of `keys` that `matches` picks.
    fn unmark_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a String>,
        matches: impl Fn(&Mark) -> bool,
    ) {
        let mut local = self.local();
        for key in keys {
            if let Some(k) = local.get_mut(key)
                && k.mark.as_ref().is_some_and(&matches)
            {
                k.unmark();
                if k.is_idle() {
                    local.remove(key);
                }
            }
        }
    }

    /// Every lock held here by `owner` (`None`: every lock) was released.
    pub(crate) fn unmark_owner(&self, owner: Option<&str>) {
        self.local().retain(|_, k| {
            if k.mark
                .as_ref()
                .is_some_and(|m| m.is_held_by(owner.map(Some)))
            {
                k.unmark();
            }
            !k.is_idle()
        });
    }

    /// Whether the multi-key waiter `w` (of `owner`) may attempt its
    /// `keys`; if so, they carry its attempt's mark until
    /// [`end_attempt`](Self::end_attempt).
    pub(crate) fn enter(&self, keys: &[String], w: &Arc<Waiter>, owner: Option<&str>) -> Gate {
        let me = Arc::as_ptr(w) as usize;
        let mut local = self.local();
        let marks = keys
            .iter()
            .map(|k| local.get(k).and_then(|k| k.mark.as_ref()));
        let gate = gate::check(marks, me, owner);
        if matches!(gate, Gate::Open) {
            for key in keys {
                gate::claim(&mut local.entry(key.clone()).or_default().mark, me);
            }
        }
        gate
    }

    /// The attempt of `w` that [`enter`](Self::enter) let through ended:
    /// its marks go (a success replaced them with its lock's).
    pub(crate) fn end_attempt(&self, keys: &[String], w: &Arc<Waiter>) {
        let me = Arc::as_ptr(w) as usize;
        self.unmark_keys(keys, |m| m.is_attempt_of(me));
    }

    /// How many local waiters there are.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.local()
            .values()
            .map(|k| k.singles.len() + k.others.len())
            .sum()
    }

    /// How many locks the registry tracks (each has local waiters, an
    /// attempt or a withdraw under way; a lock merely held here is not
    /// counted).
    pub(crate) fn tracked(&self) -> usize {
        self.local().values().filter(|k| !k.is_unused()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(n: &str) -> Arc<Waiter> {
        Waiter::new(n, "0123456789abcdef", 1000, None, "")
    }

    #[test]
    fn local_waiters_queue_in_order_and_hand_over() {
        let w = Waiting::new("ns:", false);
        let (a, b, c) = (waiter("a"), waiter("b"), waiter("c"));
        assert!(w.join_single("k", &a).0);
        assert!(!w.join_single("k", &b).0);
        assert!(!w.join_single("k", &c).0);
        assert!(w.is_first("k", &a) && w.others_waiting("k", &a));
        let (s, more) = w.successor("k").unwrap();
        assert!(Arc::ptr_eq(&s, &a) && more);
        assert!(w.successor("k").is_none(), "already being handed");
        assert!(!w.handed("k", &a, Handoff::Granted(7, Instant::now())));
        assert_eq!(a.granted().map(|g| g.0), Some(7));
        assert!(w.is_first("k", &b));
        // b gives up: c becomes first and is woken to attempt.
        assert!(w.leave_single("k", &b, false).is_none());
        assert!(c.take_woken());
        let withdrawal = w
            .leave_single("k", &c, false)
            .expect("the last one withdraws");
        assert_eq!(w.len(), 0);
        assert_eq!(
            w.begin_withdraw("k", &withdrawal, Entry::Handoff),
            Some(true)
        );
        w.end_withdraw("k", &withdrawal);
        assert_eq!(w.tracked(), 0);
    }

    #[test]
    fn messages_wake_the_first_waiter_and_report_unwanted_reservations() {
        let w = Waiting::new("ns:", false);
        let (a, b, m) = (waiter("a"), waiter("b"), waiter("m"));
        w.join_single("k", &a);
        w.join_single("k", &b);
        w.join_woken("k", &m);
        assert!(w.dispatch("rk").is_none());
        assert!(a.take_woken() && !b.take_woken() && m.take_woken());
        assert_eq!(
            w.dispatch("rother").map(|(k, _)| k),
            Some("other".to_owned())
        );
        assert!(w.dispatch("rother").is_none(), "one withdraw at a time");
        assert!(w.dispatch("wother").is_none());
        assert!(w.dispatch("").is_none());
    }

    #[test]
    fn a_withdraw_is_called_off_or_waited_for_by_a_newcomer() {
        let w = Waiting::new("ns:", false);
        let (a, b) = (waiter("a"), waiter("b"));
        w.join_single("k", &a);
        let first = w.leave_single("k", &a, false).unwrap();
        // Joining before it is sent calls it off.
        assert!(w.join_single("k", &b).1.is_none());
        assert_eq!(w.begin_withdraw("k", &first, Entry::Handoff), None);
        let second = w.leave_single("k", &b, false).unwrap();
        assert_eq!(w.begin_withdraw("k", &second, Entry::Handoff), Some(true));
        // Joining after it was sent waits for its answer.
        let wait_for = w
            .join_single("k", &a)
            .1
            .expect("a sent withdraw to wait for");
        assert!(Arc::ptr_eq(&wait_for, &second));
        w.end_withdraw("k", &second);
        assert!(wait_for.is_finished());
        // A multi-key waiter's withdraw leaves a reservation to the
        // single-key waiters while there are some.
        let m = waiter("m");
        w.join_woken("k", &m);
        let woken = w.leave_woken("k", &m, true).unwrap();
        assert_eq!(w.begin_withdraw("k", &woken, Entry::Wake), Some(false));
    }

    #[test]
    fn an_unanswered_handoff_leaves_the_waiter_unsure() {
        let w = Waiting::new("ns:", false);
        let a = waiter("a");
        w.join_single("k", &a);
        let (s, _) = w.successor("k").unwrap();
        assert!(!w.handed("k", &s, Handoff::Unknown));
        assert!(s.is_unsure() && s.take_woken() && !s.is_being_handed());
        assert!(w.mark_gone(&s), "a call ending now must undo by its nonce");
    }

    #[test]
    fn a_grant_to_a_gone_waiter_is_reported_for_undo() {
        let w = Waiting::new("ns:", false);
        let a = waiter("a");
        w.join_single("k", &a);
        let (s, _) = w.successor("k").unwrap();
        assert!(!w.mark_gone(&s));
        assert!(
            w.handed("k", &s, Handoff::Granted(1, Instant::now())),
            "must be undone"
        );
    }
}
