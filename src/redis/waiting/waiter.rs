//! One waiting acquire call ([`Waiter`]), and a withdraw of a queue entry
//! that waiters joining meanwhile wait for ([`Withdrawal`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::redis::layout::OwnerIndex;

/// One waiter: an acquire call waiting for its lock(s).
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) owner: String,
    pub(crate) nonce: String,
    pub(crate) ttl_ms: u64,
    pub(crate) index: Option<OwnerIndex>,
    /// Its holder metadata for inspection (`""`: none).
    pub(crate) metadata: String,
    state: Mutex<State>,
    notify: Notify,
}

/// What a waiter is up to; the registry (`super`) reads and sets it.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Asked to make an attempt (a message for its lock, a reconnect, or it
    /// became the first local waiter after another gave up).
    pub(super) woken: bool,
    /// A local release is handing it the lock right now.
    pub(super) handing: bool,
    /// The lock was handed to it: the token, and when the release was sent.
    pub(super) granted: Option<(u64, Instant)>,
    /// Its acquire call has ended; a grant arriving now must be undone.
    pub(super) gone: bool,
    /// Its own acquire script is in flight: no release may hand it the
    /// lock meanwhile (it could end up granted twice).
    pub(super) attempting: bool,
    /// A release that was handing it the lock ended without an answer (it
    /// failed, or its future was dropped): the lock may be held under this
    /// waiter's nonce. Its next attempt (same nonce) finds out; a call
    /// that ends without the lock undoes by nonce.
    pub(super) unsure: bool,
}

impl Waiter {
    pub(crate) fn new(
        owner: &str,
        nonce: &str,
        ttl_ms: u64,
        index: Option<OwnerIndex>,
        metadata: &str,
    ) -> Arc<Waiter> {
        Arc::new(Waiter {
            owner: owner.to_owned(),
            nonce: nonce.to_owned(),
            ttl_ms,
            index,
            metadata: metadata.to_owned(),
            state: Mutex::default(),
            notify: Notify::new(),
        })
    }

    /// Its state, locked (a panic elsewhere does not poison it for good).
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the waiter to look at its state again.
    pub(super) fn notify(&self) {
        self.notify.notify_one();
    }

    /// Asks it to make an attempt, and wakes it.
    pub(super) fn wake(&self) {
        self.state().woken = true;
        self.notify.notify_one();
    }

    /// Waits until woken, granted, or `until`. Returns whether it was
    /// notified (woken or granted) rather than reaching `until`.
    pub(crate) async fn sleep_until(&self, until: Instant) -> bool {
        tokio::select! {
            _ = self.notify.notified() => true,
            _ = tokio::time::sleep_until(until) => false,
        }
    }

    /// Takes the "make an attempt" flag.
    pub(crate) fn take_woken(&self) -> bool {
        std::mem::take(&mut self.state().woken)
    }

    /// The grant, if the lock was handed to this waiter.
    pub(crate) fn granted(&self) -> Option<(u64, Instant)> {
        self.state().granted
    }

    /// Whether a local release is handing this waiter the lock right now.
    pub(crate) fn is_being_handed(&self) -> bool {
        self.state().handing
    }

    /// Whether a handoff to this waiter ended without an answer.
    #[cfg(test)]
    pub(crate) fn is_unsure(&self) -> bool {
        self.state().unsure
    }

    /// Marks the waiter as possibly holding the lock (it gave up while a
    /// release was handing it over).
    pub(crate) fn set_unsure(&self) {
        self.state().unsure = true;
    }

    /// Starts an attempt of its own, unless a release is handing it the
    /// lock or already did. Returns whether it may attempt.
    pub(crate) fn begin_attempt(&self) -> bool {
        let mut st = self.state();
        if st.handing || st.granted.is_some() {
            return false;
        }
        st.attempting = true;
        true
    }

    /// Ends an attempt of its own.
    pub(crate) fn end_attempt(&self) {
        self.state().attempting = false;
    }
}

/// A withdraw of this process's entry from one lock's Redis queue, between
/// the moment its last local waiter left and Redis's answer. Waiters that
/// join meanwhile wait for it ([`Withdrawal::wait`]) or call it off.
#[derive(Debug, Default)]
pub(crate) struct Withdrawal {
    finished: AtomicBool,
    done: Notify,
}

impl Withdrawal {
    /// Until the withdraw is answered or called off.
    pub(crate) async fn wait(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.finished.load(Ordering::Acquire) {
                return;
            }
            done.await;
        }
    }

    /// Whether the withdraw was answered or called off.
    #[cfg(test)]
    pub(super) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// The withdraw was answered or called off: lets its waiters go on.
    pub(super) fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.done.notify_waiters();
    }
}
