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
        let successor = match &self.inner.waiting {
            // A direct handoff writes the successor's lock in the releaser's
            // script, where no WAIT can follow it: with replica
            // acknowledgement the next waiter claims its reservation through
            // an acquisition instead.
            Some(w) if lock_keys.len() == 1 && self.inner.replicas.0 == 0 => {
                w.successor(&lock_keys[0]).map(|s| (Arc::clone(w), s))
            }
            _ => None,
        };
        let sent_at = Instant::now();
        let result = self
            .run_release(
                &lock_keys,
                owner,
                "",
                successor.as_ref().map(|(_, (w, more))| Successor {
                    owner: &w.owner,
                    nonce: &w.nonce,
                    ttl_ms: w.ttl_ms,
                    index: w.index.as_deref(),
                    more: *more,
                }),
            )
            .await;
        if let Some((waiting, (w, _))) = &successor {
            let grant = match &result {
                Ok((_, token)) if *token > 0 => Some((*token, sent_at)),
                _ => None,
            };
            if waiting.handed(&lock_keys[0], w, grant) {
                // Its call ended meanwhile: nobody holds this grant.
                self.undo_later(
                    vec![lock_keys[0].clone()],
                    w.owner.clone(),
                    w.nonce.clone(),
                    None,
                );
            }
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

    /// [`withdraw`](Self::withdraw) in the background (from a `Drop`).
    pub(super) fn withdraw_later(&self, lock_key: String, wake_entry: bool) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let provider = self.clone();
            runtime.spawn(async move { provider.withdraw(&lock_key, wake_entry).await });
        }
    }

    /// Takes this process's entry out of the queue of `lock_key`, passing
    /// on a reservation made for it.
    pub(super) async fn withdraw(&self, lock_key: &str, wake_entry: bool) {
        let Some(waiting) = &self.inner.waiting else {
            return;
        };
        let entry = if wake_entry {
            format!("~{}", waiting.pid)
        } else {
            waiting.pid.clone()
        };
        let prefix = self.channel_prefix_for(lock_key);
        let args = WithdrawArgs {
            lock_key,
            entry: &entry,
            pid: &waiting.pid,
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
