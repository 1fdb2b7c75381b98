//! `execute`: lock, run a job under a renewed lease, unlock.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::error::LockError;
use crate::keys::Keys;
use crate::lease::Lease;
use crate::metrics;
use crate::module::{LockingModule, acquire_traced, extend_traced, wait_of};
use crate::options::{DEFAULT_EXECUTE_LEASE, ExecuteOptions, check_lease};
use crate::provider::{AcquireRequest, LockingProvider, Wait};
use crate::token::execute_owner;

/// What an `execute` job holds: the lease's fencing tokens, and the signal
/// that fires when the lease is lost.
///
/// It dereferences to that [`CancellationToken`], so `held.is_cancelled()`
/// and `held.cancelled().await` work directly. Pass
/// [`fencing_token`](Held::fencing_token) with every write the lock guards,
/// and have the store refuse tokens lower than the highest it has seen.
#[derive(Debug, Clone)]
pub struct Held {
    lost: CancellationToken,
    keys: Arc<[String]>,
    tokens: Arc<[u64]>,
    sent_at: Instant,
    lease: Duration,
}

impl Held {
    /// The fencing token of the first key (the only one, for one key).
    pub fn fencing_token(&self) -> u64 {
        self.tokens[0]
    }

    /// The fencing token of `key`, if the job holds it.
    pub fn token_of(&self, key: &str) -> Option<u64> {
        crate::lease::token_of(&self.keys, &self.tokens, key)
    }

    /// The keys held.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The signal that fires when the lease is lost.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// When the first lease ends if no renewal succeeds: the acquisition's
    /// send time plus the lease, so never later than Redis's own deadline.
    pub fn first_lease_ends(&self) -> Instant {
        self.sent_at + self.lease
    }
}

impl std::ops::Deref for Held {
    type Target = CancellationToken;

    fn deref(&self) -> &CancellationToken {
        &self.lost
    }
}

/// The shortest renewal interval, so that a tiny lease cannot turn the
/// renewal into a busy loop.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(1);

/// The longest pause between renewal retries after a backend failure.
const MAX_RENEW_RETRY: Duration = Duration::from_secs(1);

impl LockingModule {
    /// Runs `job` while holding every key, then releases them.
    ///
    /// Each call gets a fresh owner (`execute:<uuid>`), so only this call can
    /// release its locks. The lease (`expire`, default 60 s) is renewed every
    /// third of it while the job runs, on every provider. The job receives a
    /// [`Held`]: the fencing tokens, and a [`CancellationToken`] that fires
    /// when the lease is lost (a renewal finds the lock gone, or renewals
    /// fail until the lease has run out);
    /// `execute` then returns [`LockError::LeaseLost`] once the job has
    /// returned. The job should stop early when the token fires: nothing
    /// stops it by force.
    ///
    /// The locks are released when the job returns, and also when it
    /// panics (the panic then resumes). The job's own result, including its
    /// own errors, is returned as `Ok(T)`; a job returning `Result<U, E>`
    /// gives `Result<Result<U, E>, LockError>`.
    ///
    /// # Errors
    ///
    /// - [`LockError::TimedOut`] (`Timed-out acquiring lock.`) when the keys
    ///   stay held past `timeout` (default: the provider's wait timeout, 5 s
    ///   unless configured); [`LockError::Contended`] with a zero timeout. The
    ///   job is not run and nothing is held.
    /// - [`LockError::LeaseLost`] (`Lost the lock for key(s) ...`) when the
    ///   lease was lost while the job ran.
    /// - [`LockError::InvalidInput`], [`LockError::UnknownProvider`],
    ///   [`LockError::ForeignValue`], [`LockError::Backend`] while acquiring.
    ///
    /// A failure to release after the job is logged (`tracing` warning) and
    /// does not replace the job's result: the lock then expires with its
    /// lease.
    ///
    /// # Panics
    ///
    /// Resumes the job's panic after releasing the locks.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped while acquiring, nothing stays held (see
    /// [`acquire`](LockingModule::acquire)). If it is dropped while the job
    /// runs, or while releasing, the job is dropped with it, renewal stops,
    /// and the locks are released in the background (a round trip later;
    /// retried through transient failures for 10 s, after which they expire
    /// with their lease).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lockstep::LockError> {
    /// use lockstep::{ExecuteOptions, LockingModule};
    ///
    /// let locking = LockingModule::new();
    /// let stock = locking
    ///     .execute("item_1", ExecuteOptions::new(), |held| async move {
    ///         // ... read, check and write with held.fencing_token(),
    ///         // stopping if the lease is lost ...
    ///         assert!(!held.is_cancelled() && held.fencing_token() > 0);
    ///         41 + 1
    ///     })
    ///     .await?;
    /// assert_eq!(stock, 42);
    /// # Ok(()) }
    /// ```
    pub async fn execute<T, F, Fut>(
        &self,
        keys: impl Into<Keys>,
        options: ExecuteOptions,
        job: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(Held) -> Fut,
        Fut: Future<Output = T>,
    {
        let (id, provider) = self.route(options.provider.as_deref())?;
        let keys = keys.into().validated()?;
        let lease = check_lease("expire", options.expire.unwrap_or(DEFAULT_EXECUTE_LEASE))?;
        // A provider's default may be "forever" in effect (Duration::MAX).
        let default_wait = Instant::now()
            .checked_add(provider.default_wait_timeout())
            .map_or(Wait::Forever, Wait::Until);
        let wait = wait_of(options.patience, default_wait)?;
        let owner = execute_owner();
        let metadata = self.holder_metadata(options.metadata.as_deref())?;
        let request = AcquireRequest {
            keys,
            owner: Some(owner),
            expire: Some(lease),
            wait,
            // The owner is private to this call, which releases by itself.
            indexed: false,
            metadata,
        };
        let acquired = acquire_traced(id, provider, &request).await?;
        let (keys, owner) = (&request.keys, request.owner.as_deref());
        // Released however this call ends: after the job, and in the
        // background if the future is dropped (the job with it).
        let guard = Lease {
            keys: keys.clone(),
            tokens: acquired.tokens.clone(),
            reentered: acquired.reentered.clone(),
            owner: request.owner.clone(),
            expire: Some(lease),
            sent_at: acquired.sent_at,
            acquired_at: metrics::Acquired::now(),
            provider_id: id.to_owned(),
            provider: Arc::clone(provider),
        }
        .guard();

        let lost = CancellationToken::new();
        let held = Held {
            lost: lost.clone(),
            keys: keys.clone().into(),
            tokens: acquired.tokens.clone().into(),
            sent_at: acquired.sent_at,
            lease,
        };
        let job = AssertUnwindSafe(job(held)).catch_unwind();
        let renewal = keep_alive(id, provider, keys, owner, lease, acquired.sent_at);
        tokio::pin!(job, renewal);
        let mut lease_lost = None;
        let outcome = loop {
            tokio::select! {
                outcome = &mut job => break outcome,
                error = &mut renewal, if lease_lost.is_none() => {
                    tracing::warn!(provider = id, keys = ?keys, "{error}");
                    lost.cancel();
                    metrics::lease_lost(id);
                    lease_lost = Some(error);
                }
            }
        };

        // Released also after a loss: if renewals failed only because the
        // backend was unreachable, the lock may still be ours. The owner is
        // unique to this call, so this can never free anyone else's lock.
        if let Err(error) = guard.release().await {
            tracing::warn!(
                provider = id,
                keys = ?keys,
                "Failed to release lock after execute; it will expire with its lease: {error}"
            );
        }
        match (outcome, lease_lost) {
            (Err(panic), _) => std::panic::resume_unwind(panic),
            (Ok(_), Some(error)) => Err(error),
            (Ok(value), None) => Ok(value),
        }
    }
}

/// Renews the lease every `lease / 3` until it is lost; returns the loss.
///
/// The lease is counted from the moment each successful renewal was *sent*,
/// so the local deadline is never later than Redis's. A backend failure is
/// retried (E8) until that deadline; a renewal still unanswered at the
/// deadline counts as lost.
async fn keep_alive(
    id: &str,
    provider: &Arc<dyn LockingProvider>,
    keys: &[String],
    owner: Option<&str>,
    lease: Duration,
    mut valid_from: Instant,
) -> LockError {
    let interval = (lease / 3).max(MIN_RENEW_INTERVAL);
    let retry = (interval / 4).clamp(MIN_RENEW_INTERVAL, MAX_RENEW_RETRY);
    let mut next = valid_from + interval;
    let lost = || LockError::LeaseLost {
        keys: keys.to_vec(),
    };
    loop {
        sleep_until(next).await;
        let deadline = valid_from + lease;
        let sent = Instant::now();
        match timeout_at(deadline, extend_traced(id, provider, keys, owner, lease)).await {
            Ok(Ok(())) => {
                metrics::renewal(id, true);
                valid_from = sent;
                next = sent + interval;
            }
            Ok(Err(error)) if error.is_lost() => {
                metrics::renewal(id, false);
                return lost();
            }
            Ok(Err(error)) => {
                metrics::renewal(id, false);
                tracing::debug!(provider = id, "lease renewal failed, retrying: {error}");
                next = (Instant::now() + retry).min(deadline);
                if Instant::now() >= deadline {
                    return lost();
                }
            }
            Err(_elapsed) => {
                metrics::renewal(id, false);
                return lost();
            }
        }
    }
}
