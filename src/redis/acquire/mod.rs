//! Acquisition on Redis: one attempt (`acquire.lua`), the guard that keeps
//! a failed or cancelled acquisition from leaving anything behind, and the
//! choice of a way to wait (`wait.rs`). Replica acknowledgement is in
//! `replicas.rs`.

mod replicas;
mod wait;

use std::time::Duration;

use super::RedisProvider;
use super::keyset::Keyset;
use super::scripts::ACQUIRE;
use super::scripts::acquire::{AcquireArgs, AcquireReply};
use super::wire::{millis_ceil, nonce};
use crate::error::LockError;
use crate::provider::{AcquireRequest, Acquired, Wait};

/// How an attempt asks to be queued if it finds a lock held.
pub(super) struct Queueing<'a> {
    /// This process's pid.
    pub(super) pid: &'a str,
    /// The entry to queue (`"<pid>"`, or `"~<pid>"` to be woken only).
    pub(super) entry: &'a str,
    /// More local waiters wait for the same lock.
    pub(super) more: bool,
    /// How long the queue must live for this wait, ms.
    pub(super) queue_ttl_ms: u64,
}

/// Whether a waiting acquisition should try again after `e`: a backend
/// failure that may pass (no connection, no reply, replicas not caught up,
/// as during a failover), with time left before the deadline. An attempt
/// without a reply may have taken the locks; a later attempt with the same
/// nonce finds them its own.
fn keep_trying(request: &AcquireRequest, e: &LockError) -> bool {
    e.is_transient() && request.wait.remaining() != Some(Duration::ZERO)
}

fn wait_span(key: &str) -> tracing::Span {
    tracing::trace_span!("lockstep.wait", provider = "locking-redis", key = %key)
}

/// The error for a key holding a value of another type.
pub(super) fn foreign(request: &AcquireRequest, index: usize) -> LockError {
    let key = request.keys.get(index).unwrap_or(&request.keys[0]);
    LockError::ForeignValue { key: key.clone() }
}

/// Undoes an acquisition whose reply never arrived, when dropped armed: on
/// an "outcome unknown" error, and when the caller's future is dropped
/// mid-call. Releases only what this acquisition took (matched by its
/// nonce), in a background task that retries until it succeeds, the lease
/// would have ended anyway, or the provider shuts down.
struct UndoGuard<'a> {
    provider: &'a RedisProvider,
    keys: &'a [String],
    owner: &'a str,
    nonce: &'a str,
    expire: Option<Duration>,
    armed: bool,
}

impl UndoGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for UndoGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.provider.undo_later(
                self.keys.to_vec(),
                self.owner.to_owned(),
                self.nonce.to_owned(),
                self.expire,
            );
        }
    }
}

impl RedisProvider {
    /// [`LockingProvider::acquire`](crate::provider::LockingProvider::acquire).
    pub(super) async fn acquire_inner(
        &self,
        request: &AcquireRequest,
    ) -> Result<Acquired, LockError> {
        self.inner.conns.check_open()?;
        let owner = request.owner.as_deref().filter(|_| request.indexed);
        let keys = self.keyset(&request.keys, owner);
        let nonce = nonce(request.expire.is_none());
        // Any attempt may have taken the locks without our hearing of it
        // (a lost reply, a dropped future): undo by this call's nonce
        // unless the call ends with an answer.
        let undo = UndoGuard {
            provider: self,
            keys: keys.locks(),
            owner: request.owner.as_deref().unwrap_or(""),
            nonce: &nonce,
            expire: request.expire,
            armed: true,
        };
        let result = match (&self.inner.waiting, request.wait) {
            (_, Wait::Once) => self.acquire_once(request, &keys, &nonce).await,
            (Some(w), _) => {
                // Listening (on a cluster: in the keys' slots) before the
                // first attempt, so that no release after it goes unheard.
                let _listening = self.listen(&keys, request.wait).await;
                if keys.lock_count == 1 && self.inner.fair {
                    self.acquire_queued(w, request, &keys, &nonce).await
                } else {
                    self.acquire_woken(w, request, &keys, &nonce).await
                }
            }
            (None, _) => self.acquire_polling(request, &keys, &nonce).await,
        };
        // An attempt without a reply may have taken the locks: unless this
        // call ends holding them, `undo` releases them (by nonce) on drop.
        if result.is_ok() || !keys.is_uncertain() {
            undo.disarm();
        }
        if let (Ok(acquired), Some(w)) = (&result, &self.inner.waiting) {
            // For the gate of this process's multi-key waiters.
            let until = request.expire.map(|d| acquired.sent_at + d);
            w.mark_held(keys.locks(), request.owner.as_deref(), until);
        }
        result
    }

    /// A single attempt; never queues (and, when fair, never takes a lock
    /// another process is queued for).
    async fn acquire_once(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        self.try_once(request, keys, nonce, 0)
            .await?
            .map_err(|index| request.wait.give_up(&request.keys[index]))
    }

    /// One run of `acquire.lua` for the request, queued as `queueing` says
    /// if a lock is held, with fencing tokens of at least `token_floor` µs
    /// (a Redlock set's clock; 0 otherwise).
    pub(super) async fn attempt(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
        queueing: Option<&Queueing<'_>>,
        token_floor: u64,
    ) -> Result<AcquireReply, LockError> {
        let args = AcquireArgs {
            owner: request.owner.as_deref().unwrap_or(""),
            nonce,
            ttl_ms: request.expire.map_or(0, millis_ceil),
            pid: queueing.map_or("", |q| q.pid),
            entry: queueing.map_or("", |q| q.entry),
            queue_ttl_ms: queueing.map_or(0, |q| q.queue_ttl_ms),
            more: queueing.is_some_and(|q| q.more),
            keep_reentered_lease: false,
            token_floor,
            metadata: request.metadata.as_deref().unwrap_or(""),
        };
        // Boxed: inline, it would make every waiting acquisition's future
        // larger than the allocator's cache of small blocks serves (about
        // 1 KiB: a larger block costs several times as much to allocate
        // and free, on every acquisition).
        let reply = Box::pin(self.run_attempt(keys, &args)).await;
        if reply.as_ref().is_err_and(LockError::is_outcome_unknown) {
            keys.set_uncertain();
        }
        reply
    }

    /// `acquire.lua` on one server (with replica acknowledgement if
    /// configured).
    pub(super) async fn attempt_single(
        &self,
        keys: &Keyset,
        args: &AcquireArgs<'_>,
    ) -> Result<AcquireReply, LockError> {
        let argv = args.argv(keys.lock_count);
        let reply = if self.inner.replicas.0 > 0 {
            // Boxed, as the cluster's path: rare, and a large future.
            Box::pin(self.acquire_replicated(keys, &argv, args)).await
        } else {
            self.inner
                .conns
                .eval("acquire", &ACQUIRE, &keys.keys, &argv)
                .await
        };
        AcquireReply::decode(reply?, keys.lock_count)
    }
}
