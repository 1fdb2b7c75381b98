//! Release on Redis: owner- or nonce-checked, handing each released lock to
//! the next waiter, and the background undo of acquisitions whose outcome
//! is unknown.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::acquire::RETRY_MIN;
use super::waiting::Waiter;
use super::{RedisProvider, scripts, unexpected};
use crate::error::LockError;

/// The longest pause between attempts to undo an acquisition whose reply
/// was lost.
const UNDO_RETRY_MAX: Duration = Duration::from_secs(5);

impl RedisProvider {
    /// Releases what the acquisition `nonce` of `owner` holds among `keys`.
    #[cfg(feature = "redlock")]
    pub(crate) async fn release_nonce(
        &self,
        keys: &[String],
        owner: Option<&str>,
        nonce: &str,
    ) -> Result<Vec<bool>, LockError> {
        let lock_keys: Vec<String> = keys.iter().map(|k| self.inner.layout.lock_key(k)).collect();
        Ok(self
            .release_keys(&lock_keys, owner.unwrap_or(""), nonce, None)
            .await?
            .0)
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
        let keys = [lock_key.to_owned(), self.inner.layout.queue_key(lock_key)];
        let claim = self.inner.claim_ms.to_string();
        let prefix = self.channel_prefix_for(lock_key);
        let args = [
            entry.as_str(),
            waiting.pid.as_str(),
            claim.as_str(),
            prefix.as_ref(),
        ];
        if let Err(e) = self
            .eval("withdraw", &scripts::WITHDRAW, &keys, &args)
            .await
        {
            tracing::debug!("withdrawing from the queue of {lock_key} failed: {e}");
        }
    }

    /// Releases, in the background, whatever the acquisition `nonce` of
    /// `owner` holds among `lock_keys`.
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
            let mut pause = RETRY_MIN;
            loop {
                match provider
                    .release_keys(&lock_keys, &owner, &nonce, None)
                    .await
                {
                    Ok(_) | Err(LockError::Shutdown { .. }) => return,
                    Err(e) => {
                        tracing::debug!("undoing an unanswered acquisition failed, retrying: {e}")
                    }
                }
                if give_up_at.is_some_and(|at| Instant::now() >= at) {
                    return;
                }
                sleep(pause).await;
                pause = (pause * 2).min(UNDO_RETRY_MAX);
            }
        });
    }

    /// Runs `release.lua` on already-mapped lock keys, handing the first to
    /// `successor` (a local waiter, and whether more follow it) if no other
    /// process is queued first. Returns per key whether it was released, and
    /// the successor's token if it got the lock.
    pub(super) async fn release_keys(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
        successor: Option<(&Waiter, bool)>,
    ) -> Result<(Vec<bool>, u64), LockError> {
        #[cfg(feature = "cluster")]
        if self.is_cluster() {
            if let [lock_key] = lock_keys {
                // One slot: one script, which can hand the lock on.
                let layout = &self.inner.layout;
                let index = (!owner.is_empty())
                    .then(|| layout.slot_owner_index(owner, layout.slot_of(lock_key)));
                return self
                    .release_script(lock_keys, index, owner, nonce, successor)
                    .await;
            }
            let released = self.release_grouped(lock_keys, owner, nonce).await?;
            return Ok((released, 0));
        }
        let index = (!owner.is_empty()).then(|| self.inner.layout.owner_index(owner));
        self.release_script(lock_keys, index, owner, nonce, successor)
            .await
    }

    /// One run of `release.lua` (all keys in one slot on a cluster).
    pub(super) async fn release_script(
        &self,
        lock_keys: &[String],
        index: Option<String>,
        owner: &str,
        nonce: &str,
        successor: Option<(&Waiter, bool)>,
    ) -> Result<(Vec<bool>, u64), LockError> {
        let layout = &self.inner.layout;
        let n = lock_keys.len();
        let mut keys = lock_keys.to_vec();
        keys.extend(lock_keys.iter().map(|k| layout.fence_key_of(k)));
        keys.extend(lock_keys.iter().map(|k| layout.queue_key(k)));
        let indexed = index.is_some();
        keys.extend(index);
        let (succ_owner, succ_nonce, succ_ttl, more) = match successor {
            Some((w, more)) => (w.owner.as_str(), w.nonce.as_str(), w.ttl_ms, more),
            None => ("", "", 0, false),
        };
        let succ_index = successor.and_then(|(w, _)| w.index.clone());
        if let Some(i) = &succ_index {
            keys.push(i.clone());
        }
        let pid = self.inner.waiting.as_ref().map_or("", |w| w.pid.as_str());
        let args = [
            n.to_string(),
            owner.to_owned(),
            nonce.to_owned(),
            self.inner.claim_ms.to_string(),
            self.channel_prefix_for(&lock_keys[0]).into_owned(),
            if indexed { "1" } else { "0" }.to_owned(),
            succ_owner.to_owned(),
            succ_nonce.to_owned(),
            succ_ttl.to_string(),
            if succ_index.is_some() { "1" } else { "0" }.to_owned(),
            pid.to_owned(),
            if more { "1" } else { "0" }.to_owned(),
            (2 * self.inner.claim_ms + 1000).to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = self
            .eval("release", &scripts::RELEASE, &keys, &args)
            .await?;
        let mut flags: Vec<i64> =
            redis::from_redis_value(reply).map_err(|e| unexpected("release", e))?;
        if flags.len() != n + 1 {
            return Err(unexpected("release", "wrong number of results"));
        }
        let token = flags.pop().unwrap_or(0).max(0) as u64;
        Ok((flags.into_iter().map(|f| f == 1).collect(), token))
    }

    pub(super) async fn release_inner(
        &self,
        keys: &[String],
        owner: Option<&str>,
    ) -> Result<Vec<bool>, LockError> {
        self.check_open()?;
        let lock_keys: Vec<String> = keys.iter().map(|k| self.inner.layout.lock_key(k)).collect();
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
            .release_keys(
                &lock_keys,
                owner,
                "",
                successor.as_ref().map(|(_, (w, more))| (&**w, *more)),
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
}
