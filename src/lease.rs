//! What a successful acquisition returns.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::error::LockError;
use crate::options::check_lease;
use crate::provider::LockingProvider;
use crate::retry::ride_out;

/// Locks held after a successful [`acquire`](crate::LockingModule::acquire).
///
/// A lease carries the owner and, per key, the **fencing token**: an integer
/// strictly greater than any token handed out before for that key. Pass it
/// with every write the lock protects, and have the store reject a token
/// lower than the highest it has seen: a holder that was paused past its
/// lease is then refused instead of silently overwriting its successor.
///
/// Dropping a lease does not release it: `Drop` cannot wait for Redis. Call
/// [`release`](Lease::release) (or the module's `release` with the same
/// owner); a lease that is never released is freed when it expires. Where
/// early returns (`?`) can skip the release, make it a [`LeaseGuard`] with
/// [`guard`](Lease::guard): dropped, it is released in the background.
pub struct Lease {
    pub(crate) keys: Vec<String>,
    pub(crate) tokens: Vec<u64>,
    pub(crate) reentered: Vec<bool>,
    pub(crate) owner: Option<String>,
    pub(crate) expire: Option<Duration>,
    pub(crate) sent_at: Instant,
    /// When it was acquired (for `lockstep_hold_seconds`).
    pub(crate) acquired_at: crate::metrics::Acquired,
    pub(crate) provider_id: String,
    pub(crate) provider: Arc<dyn LockingProvider>,
}

impl Lease {
    /// The distinct keys held, in the order they were asked for.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The owner, or `None` for an anonymous lock.
    pub fn owner_id(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The fencing token of the first key (for a single-key lease, its only
    /// key).
    pub fn fencing_token(&self) -> u64 {
        self.tokens[0]
    }

    /// The fencing token of `key`, if the lease holds it.
    pub fn token_of(&self, key: &str) -> Option<u64> {
        token_of(&self.keys, &self.tokens, key)
    }

    /// Every key with its fencing token.
    pub fn fencing_tokens(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.keys
            .iter()
            .map(String::as_str)
            .zip(self.tokens.iter().copied())
    }

    /// Whether `key` was already held by the same owner before this
    /// acquisition (re-entry). Releasing a re-entered key frees the earlier
    /// hold too: re-entry is not counted.
    pub fn was_reentered(&self, key: &str) -> bool {
        self.keys
            .iter()
            .position(|k| k == key)
            .is_some_and(|i| self.reentered[i])
    }

    /// The keys this acquisition took that were not held by the owner before.
    pub fn newly_acquired(&self) -> impl Iterator<Item = &str> + '_ {
        self.keys
            .iter()
            .zip(&self.reentered)
            .filter(|(_, re)| !**re)
            .map(|(k, _)| k.as_str())
    }

    /// The lease length asked for, if any.
    pub fn expire(&self) -> Option<Duration> {
        self.expire
    }

    /// The instant after which the lease may have expired: the time the
    /// acquisition (or last extension) was *sent* plus its lease, so it errs
    /// on the early side. `None` when no `expire` was given: the new locks do
    /// not expire, and re-entered ones keep the lease they had.
    pub fn valid_until(&self) -> Option<Instant> {
        self.expire.map(|e| self.sent_at + e)
    }

    /// The id of the provider that holds the locks.
    pub fn provider_id(&self) -> &str {
        &self.provider_id
    }

    /// Releases every key of the lease. Returns `true` if all of them were
    /// still held by this owner and are now free; keys held by others are
    /// left alone.
    ///
    /// # Errors
    ///
    /// Backend failures. The release can then be repeated: it is idempotent.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened,
    /// and the lease is gone: what was not released expires with its lease.
    /// A local waiter the release was handing the lock to is told and takes
    /// it, or the hand-off is undone. Use [`LeaseGuard::release`] to have a
    /// dropped release finished in the background.
    pub async fn release(self) -> Result<bool, LockError> {
        self.release_now().await
    }

    /// Makes this lease a guard that releases it when dropped (an early
    /// return, a panic, a dropped future), in the background.
    pub fn guard(self) -> LeaseGuard {
        LeaseGuard { lease: Some(self) }
    }

    async fn release_now(&self) -> Result<bool, LockError> {
        let released = self
            .provider
            .release(&self.keys, self.owner.as_deref())
            .await?;
        self.acquired_at.released(&self.provider_id);
        Ok(released.iter().all(|r| *r))
    }

    /// Sets the lease of every key to `lease` from now, if this owner still
    /// holds all of them.
    ///
    /// # Errors
    ///
    /// [`LockError::NotOwner`] if a key is no longer held by this owner
    /// (nothing is changed), [`LockError::InvalidInput`] for a zero or absurd
    /// lease, or a backend failure.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the extension may or may not have happened;
    /// [`valid_until`](Lease::valid_until) keeps the earlier deadline.
    pub async fn extend(&mut self, lease: Duration) -> Result<(), LockError> {
        let lease = check_lease("expire", lease)?;
        let sent_at = Instant::now();
        self.provider
            .extend(&self.keys, self.owner.as_deref(), lease)
            .await?;
        self.expire = Some(lease);
        self.sent_at = sent_at;
        Ok(())
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The provider is left out: it is shared and says nothing about this lease.
        f.debug_struct("Lease")
            .field("keys", &self.keys)
            .field("tokens", &self.tokens)
            .field("reentered", &self.reentered)
            .field("owner", &self.owner)
            .field("expire", &self.expire)
            .field("provider_id", &self.provider_id)
            .finish_non_exhaustive()
    }
}

/// A [`Lease`] released when dropped.
///
/// `let lease = locking.acquire(..).await?.guard();` then `step()?` leaks
/// nothing when `step` fails: the guard's `Drop` hands the release to a
/// background task of the runtime, which rides out transient backend
/// failures for up to 10 s and logs a `warn` event if it still fails (the
/// lock then expires with its lease). Outside a Tokio runtime it can only
/// log. [`release`](LeaseGuard::release) is the explicit path, with the
/// result; it derefs to the lease for its tokens and [`Lease::extend`].
#[must_use = "dropping a guard releases its locks at once"]
#[derive(Debug)]
pub struct LeaseGuard {
    /// `None` once released (or handed back by `into_lease`).
    lease: Option<Lease>,
}

impl LeaseGuard {
    /// Releases the locks now; see [`Lease::release`].
    ///
    /// # Errors
    ///
    /// As [`Lease::release`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in effect: if the future is dropped before the release
    /// answered, the guard's `Drop` releases in the background.
    pub async fn release(mut self) -> Result<bool, LockError> {
        let result = self
            .lease
            .as_ref()
            .expect("a guard holds its lease until released")
            .release_now()
            .await;
        // Answered: nothing left for `Drop` (a backend failure is the
        // caller's to handle, as with `Lease::release`).
        self.lease = None;
        result
    }

    /// The lease, no longer released on drop.
    pub fn into_lease(mut self) -> Lease {
        self.lease
            .take()
            .expect("a guard holds its lease until released")
    }
}

impl std::ops::Deref for LeaseGuard {
    type Target = Lease;

    fn deref(&self) -> &Lease {
        self.lease
            .as_ref()
            .expect("a guard holds its lease until released")
    }
}

impl std::ops::DerefMut for LeaseGuard {
    fn deref_mut(&mut self) -> &mut Lease {
        self.lease
            .as_mut()
            .expect("a guard holds its lease until released")
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                provider = %lease.provider_id,
                keys = ?lease.keys,
                "lease guard dropped outside a Tokio runtime; its locks expire with their lease"
            );
            return;
        };
        let span = tracing::debug_span!("lockstep.guard_release", provider = %lease.provider_id);
        runtime.spawn(
            async move {
                match ride_out(|| lease.release_now()).await {
                    Ok(_) => tracing::debug!(keys = ?lease.keys, "released by a dropped guard"),
                    Err(e) => tracing::warn!(
                        keys = ?lease.keys,
                        "a dropped lease guard could not release; the locks expire with their lease: {e}"
                    ),
                }
            }
            .instrument(span),
        );
    }
}

/// The token of `key` among `keys` (`tokens[i]` is `keys[i]`'s).
pub(crate) fn token_of(keys: &[String], tokens: &[u64], key: &str) -> Option<u64> {
    keys.iter().position(|k| k == key).map(|i| tokens[i])
}
