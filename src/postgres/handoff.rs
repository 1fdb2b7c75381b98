//! Direct hand-off: a release that hands the lock straight to a waiter of
//! the releasing provider, in the same statement.
//!
//! Without it a hand-off is two statements in sequence: the release
//! reserves the lock for this provider, then its first local waiter claims
//! it. With it the releasing call *offers* that waiter (its owner, a fresh
//! nonce, its lease and metadata) to the release function, which takes the
//! lock for it when the lock would be reserved for this provider anyway
//! (it heads the queue), and the reply carries the waiter's token.
//!
//! The waiter must not act while an offer for it is in flight: it could
//! re-enter the lock the offer takes (same owner) and then lose it to the
//! offer's undo. So a waiter is `Idle`, `Attempting` (no offer is made
//! then) or `Offered` (it does not attempt; it waits for the outcome), and
//! `Gone` once its call ended. An offer whose outcome is unknown (the
//! release failed without a reply, or its future was dropped) is undone by
//! its nonce in the background, and only then is the waiter let go.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::Inner;
use super::queue::Waiter;
use crate::provider::Acquired;

/// What a direct hand-off takes the lock with: the waiting call's request.
#[derive(Debug, Clone)]
pub(crate) struct HandoffRequest {
    pub(crate) owner: Option<String>,
    /// The lease in ms; 0: no expiry.
    pub(crate) ttl_ms: i64,
    pub(crate) metadata: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    Attempting,
    Offered,
    Gone,
}

/// A waiter's side of hand-offs.
#[derive(Debug, Default)]
pub(crate) struct HandoffState {
    phase: Phase,
    /// A lock handed to it, with the nonce it was taken with and whether
    /// the offer said more local waiters were behind it.
    grant: Option<(Acquired, String, bool)>,
}

/// What a waiter does next.
pub(crate) enum Next {
    /// Attempt (it is `Attempting` now: no offer until `attempted`).
    Attempt,
    /// An offer for it is in flight: wait to be woken.
    Wait,
    /// A lock was handed to it; whether more local waiters were behind it
    /// (its provider's queue entry stayed, at the back).
    Granted(Acquired, bool),
}

impl Waiter {
    fn handoff(&self) -> MutexGuard<'_, HandoffState> {
        // Every critical section is a few assignments.
        self.handoff.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before an attempt: what to do.
    pub(crate) fn next(&self) -> Next {
        let mut s = self.handoff();
        if let Some((acquired, _, more)) = s.grant.take() {
            return Next::Granted(acquired, more);
        }
        if s.phase == Phase::Offered {
            return Next::Wait;
        }
        s.phase = Phase::Attempting;
        Next::Attempt
    }

    /// After an attempt.
    pub(crate) fn attempted(&self) {
        let mut s = self.handoff();
        if s.phase == Phase::Attempting {
            s.phase = Phase::Idle;
        }
    }

    /// The call ended: a lock handed to it and not taken up is returned,
    /// with its nonce.
    pub(crate) fn leave(&self) -> Option<String> {
        let mut s = self.handoff();
        s.phase = Phase::Gone;
        s.grant.take().map(|(_, nonce, _)| nonce)
    }
}

/// A new waiter's hand-off state.
pub(crate) fn state() -> Mutex<HandoffState> {
    Mutex::new(HandoffState::default())
}

/// An offer of the next lock of `key` to a local waiter, in flight with a
/// release. Resolved by [`granted`](Offer::granted) or
/// [`declined`](Offer::declined); dropped unresolved, it is undone.
pub(crate) struct Offer {
    inner: Arc<Inner>,
    waiter: Arc<Waiter>,
    key: String,
    pub(crate) request: HandoffRequest,
    pub(crate) nonce: String,
    /// More local waiters are behind it.
    pub(crate) more: bool,
    sent_at: Instant,
    resolved: bool,
}

impl Inner {
    /// An offer of `key`'s next lock to this provider's first local
    /// single-key waiter, if it is idle.
    pub(crate) fn offer(self: &Arc<Self>, key: &str) -> Option<Offer> {
        let waiters = self.waiters();
        let state = waiters.get(key)?;
        let first = state.singles.front()?;
        let request = first.request.clone()?;
        let mut s = first.handoff();
        if s.phase != Phase::Idle {
            return None;
        }
        s.phase = Phase::Offered;
        drop(s);
        Some(Offer {
            inner: Arc::clone(self),
            waiter: Arc::clone(first),
            key: key.to_owned(),
            request,
            nonce: super::acquire::nonce(),
            more: state.singles.len() > 1,
            sent_at: Instant::now(),
            resolved: false,
        })
    }
}

impl Offer {
    /// The release took the lock for the waiter, with `token`.
    pub(crate) fn granted(mut self, token: u64) {
        self.resolved = true;
        let mut s = self.waiter.handoff();
        if s.phase == Phase::Gone {
            drop(s);
            // Its call ended meanwhile: the lock goes back.
            let nonce = std::mem::take(&mut self.nonce);
            self.undo(nonce, false);
            return;
        }
        s.grant = Some((
            Acquired::new(vec![token], vec![false], self.sent_at),
            std::mem::take(&mut self.nonce),
            self.more,
        ));
        s.phase = Phase::Idle;
        drop(s);
        self.waiter.notify.notify_one();
    }

    /// The release did not hand the lock over (another provider heads the
    /// queue, or the lock was not released).
    pub(crate) fn declined(mut self) {
        self.resolved = true;
        self.let_go();
    }

    fn let_go(&self) {
        let mut s = self.waiter.handoff();
        if s.phase == Phase::Offered {
            s.phase = Phase::Idle;
        }
        drop(s);
        self.waiter.notify.notify_one();
    }

    /// Undoes the offer by its nonce in the background; with `then_let_go`
    /// the waiter is let go once that is done.
    fn undo(&self, nonce: String, then_let_go: bool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to undo it on: its lease (if any) runs out.
            if then_let_go {
                self.let_go();
            }
            return;
        };
        let pending = self.inner.pending();
        let (inner, key, owner) = (
            Arc::clone(&self.inner),
            self.key.clone(),
            self.request.owner.clone(),
        );
        let waiter = then_let_go.then(|| Arc::clone(&self.waiter));
        runtime.spawn(async move {
            inner.undo(None, &[key], owner.as_deref(), &nonce).await;
            if let Some(waiter) = waiter {
                let mut s = waiter.handoff();
                if s.phase == Phase::Offered {
                    s.phase = Phase::Idle;
                }
                drop(s);
                waiter.notify.notify_one();
            }
            drop(pending);
        });
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if !self.resolved {
            // The release's outcome is unknown: the lock may have been
            // taken for the waiter. Undone first, then the waiter may act.
            let nonce = std::mem::take(&mut self.nonce);
            self.undo(nonce, true);
        }
    }
}
