//! Release on Redis: owner- or nonce-checked, handing each released lock to
//! the next waiter; the background undo of acquisitions whose outcome is
//! unknown; and withdrawing from a wait queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::RedisProvider;
use super::scripts::release::{ReleaseArgs, Successor};
use super::scripts::withdraw::WithdrawArgs;
use super::scripts::{RELEASE, WITHDRAW};
use super::waiting::{Entry, Handoff, Waiter, Waiting, Withdrawal};
use crate::backoff::Backoff;
use crate::error::LockError;

/// The first and the longest pause between attempts to undo an
/// acquisition whose reply was lost.
const UNDO_RETRY: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(5));

impl RedisProvider {
    /// [`LockingProvider::release`](crate::provider::LockingProvider::release).
    pub(super) async fn release_inner(
        &self,
        keys: &[String],
        owner: Option<&str>,
    ) -> Result<Vec<bool>, LockError> {
        self.inner.conns.check_open()?;
        let lock_keys = self.lock_keys(keys);
        let owner = owner.unwrap_or("");
        let mut handing = match &self.inner.waiting {
            // A direct handoff writes the successor's lock in the releaser's
            // script, where no WAIT can follow it: with replica
            // acknowledgement the next waiter claims its reservation through
            // an acquisition instead.
            Some(w) if lock_keys.len() == 1 && self.inner.replicas.0 == 0 => {
                w.successor(&lock_keys[0]).map(|(waiter, more)| Handing {
                    provider: self,
                    waiting: w,
                    key: &lock_keys[0],
                    waiter,
                    more,
                    outcome: Handoff::Unknown,
                })
            }
            _ => None,
        };
        let sent_at = Instant::now();
        let successor = handing.as_ref().map(Handing::successor);
        let result = self.run_release(&lock_keys, owner, "", successor).await;
        if let Some(h) = &mut handing {
            h.outcome = match &result {
                Ok((_, token)) if *token > 0 => Handoff::Granted(*token, sent_at),
                Ok(_) => Handoff::Refused,
                // The script may have run: the waiter's next attempt (same
                // nonce) finds out.
                Err(_) => Handoff::Unknown,
            };
        }
        drop(handing);
        if let (Ok((released, token)), Some(w)) = (&result, &self.inner.waiting) {
            // The gate of this process's multi-key waiters opens; a lock
            // handed over to a waiter here stays marked (for it).
            let freed = lock_keys
                .iter()
                .zip(released)
                .filter(|&(_, r)| *r && *token == 0);
            w.unmark_held(freed.map(|(k, _)| k));
        }
        result.map(|(released, _)| released)
    }

    /// One run of `release.lua` (all keys in one slot on a cluster).
    pub(super) async fn release_script(
        &self,
        args: &ReleaseArgs<'_>,
    ) -> Result<(Vec<bool>, u64), LockError> {
        let reply = self
            .inner
            .conns
            .eval(
                "release",
                &RELEASE,
                &args.keys(&self.inner.layout),
                &args.argv(),
            )
            .await?;
        args.decode(reply)
    }

    /// Releases, in the background, whatever the acquisition `nonce` of
    /// `owner` holds among `lock_keys`: retried until it succeeds, the
    /// lease would have ended anyway, or the provider shuts down.
    pub(super) fn undo_later(
        &self,
        lock_keys: Vec<String>,
        owner: String,
        nonce: String,
        expire: Option<Duration>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "acquisition abandoned outside a Tokio runtime; its locks expire with their lease"
            );
            return;
        };
        let provider = self.clone();
        let give_up_at = expire.map(|e| Instant::now() + e);
        runtime.spawn(async move {
            let mut backoff = Backoff::new(UNDO_RETRY.0, UNDO_RETRY.1);
            loop {
                match provider.release_by_nonce(&lock_keys, &owner, &nonce).await {
                    Ok(_) | Err(LockError::Shutdown { .. }) => return,
                    Err(e) => {
                        tracing::debug!("undoing an unanswered acquisition failed, retrying: {e}")
                    }
                }
                if give_up_at.is_some_and(|at| Instant::now() >= at) {
                    return;
                }
                sleep(backoff.next_pause()).await;
            }
        });
    }

    /// Takes this process's `entry` out of the queue of `lock_key` in a
    /// task of its own (it is called from `Drop`s), passing on a
    /// reservation for this process that nobody here wants. Called off if
    /// a local waiter joins before it is sent; waited for by those that
    /// join after (see [`Withdrawal`]).
    pub(super) fn withdraw_later(&self, lock_key: String, entry: Entry, ticket: Arc<Withdrawal>) {
        let (Some(waiting), Ok(runtime)) = (
            self.inner.waiting.clone(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let provider = self.clone();
        runtime.spawn(async move {
            if let Some(pass_reservation) = waiting.begin_withdraw(&lock_key, &ticket, entry) {
                provider
                    .withdraw(&waiting, &lock_key, entry, pass_reservation)
                    .await;
            }
            waiting.end_withdraw(&lock_key, &ticket);
        });
    }

    /// `withdraw.lua` for this process's `entry` in the queue of `lock_key`.
    async fn withdraw(
        &self,
        waiting: &Waiting,
        lock_key: &str,
        entry: Entry,
        pass_reservation: bool,
    ) {
        let entry = match entry {
            Entry::Handoff => waiting.pid.clone(),
            Entry::Wake => format!("~{}", waiting.pid),
        };
        let prefix = self.channel_prefix_for(lock_key);
        let args = WithdrawArgs {
            lock_key,
            entry: &entry,
            pid: if pass_reservation { &waiting.pid } else { "" },
            claim_ms: self.inner.claim_ms,
            channel_prefix: &prefix,
        };
        let keys = args.keys(&self.inner.layout);
        if let Err(e) = self
            .inner
            .conns
            .eval("withdraw", &WITHDRAW, &keys, &args.argv())
            .await
        {
            tracing::debug!("withdrawing from the queue of {lock_key} failed: {e}");
        }
    }
}

/// A release handing its lock to a local waiter (the first single-key
/// waiter of the key): however the release ends, including a dropped
/// future, the waiter learns the outcome, and a lock handed to a waiter
/// whose call has ended is undone by its nonce.
struct Handing<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    key: &'a str,
    waiter: Arc<Waiter>,
    /// More local waiters follow it.
    more: bool,
    /// Until the release answers: unknown (the script may have run).
    outcome: Handoff,
}

impl Handing<'_> {
    fn successor(&self) -> Successor<'_> {
        Successor {
            owner: &self.waiter.owner,
            nonce: &self.waiter.nonce,
            ttl_ms: self.waiter.ttl_ms,
            index: self
                .waiter
                .index
                .as_ref()
                .map(|i| i.part_for(self.waiter.ttl_ms)),
            more: self.more,
            metadata: &self.waiter.metadata,
        }
    }
}

impl Drop for Handing<'_> {
    fn drop(&mut self) {
        if self.waiting.handed(self.key, &self.waiter, self.outcome) {
            // Its call ended meanwhile: nobody holds this grant.
            self.provider.undo_later(
                vec![self.key.to_owned()],
                self.waiter.owner.clone(),
                self.waiter.nonce.clone(),
                None,
            );
        }
    }
}
