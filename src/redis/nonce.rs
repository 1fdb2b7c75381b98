//! Acquisition-level calls, matched by the acquisition's nonce: one
//! attempt that never queues, and the release of exactly what one
//! acquisition took. The provider's own single attempts, undo and
//! give-backs use them, and a Redlock set runs them on each master.

use tokio::time::Instant;

use super::RedisProvider;
use super::keyset::Keyset;
use super::scripts::acquire::AcquireReply;
use crate::error::LockError;
use crate::provider::{AcquireRequest, Acquired};

impl RedisProvider {
    /// One attempt with `nonce` that never queues: the locks, or the index
    /// of a key found held. Fencing tokens are at least `token_floor` µs (a
    /// Redlock set's clock, so that its masters' tokens agree; 0
    /// otherwise).
    ///
    /// # Errors
    ///
    /// [`LockError::ForeignValue`] and backend failures; an attempt without
    /// a reply marks `keys` uncertain (it may have taken the locks).
    pub(crate) async fn try_once(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
        token_floor: u64,
    ) -> Result<Result<Acquired, usize>, LockError> {
        self.inner.conns.check_open()?;
        let sent_at = Instant::now();
        match self
            .attempt(request, keys, nonce, None, token_floor)
            .await?
        {
            AcquireReply::Acquired { tokens, reentered } => {
                Ok(Ok(Acquired::new(tokens, reentered, sent_at)))
            }
            AcquireReply::Held { index, .. } => Ok(Err(index)),
            AcquireReply::Foreign { index } => Err(super::acquire::foreign(request, index)),
        }
    }

    /// Releases what the acquisition `nonce` of `owner` (`""`: anonymous)
    /// holds among `lock_keys`, and nothing else: a lock the owner held
    /// before that acquisition (re-entered) keeps its holder. Per key,
    /// whether it was released.
    ///
    /// The connections given up on before are closed on the server first
    /// ([`Connections::fence`](super::connection::Connections::fence)), so
    /// the acquisition cannot arrive after this release and take the locks
    /// for good. Where that cannot be done (an ACL user without `CLIENT
    /// KILL`), the release is repeated once, [`REPEAT_UNFENCED`] later.
    ///
    /// # Errors
    ///
    /// Backend failures; the release can be repeated.
    pub(crate) async fn release_by_nonce(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
    ) -> Result<Vec<bool>, LockError> {
        let fenced = self.inner.conns.fence().await?;
        let released = self.run_release(lock_keys, owner, nonce, None).await?.0;
        if !fenced && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (provider, keys, owner, nonce) = (
                self.clone(),
                lock_keys.to_vec(),
                owner.to_owned(),
                nonce.to_owned(),
            );
            runtime.spawn(async move {
                tokio::time::sleep(REPEAT_UNFENCED).await;
                let _ = provider.run_release(&keys, &owner, &nonce, None).await;
            });
        }
        Ok(released)
    }
}

/// When an unanswered acquisition's old connection could not be closed on
/// the server, how much later its undo is repeated (best effort: a request
/// delayed longer than this in the network could still run after it).
const REPEAT_UNFENCED: std::time::Duration = std::time::Duration::from_secs(2);
