//! Who holds a lock: what inspection reports, and the holder metadata an
//! acquisition may record for it.

use std::time::{Duration, SystemTime};

use crate::error::{InvalidInput, LockError};
use crate::keys::Keys;
use crate::module::LockingModule;
use crate::options::{InspectOptions, ListOptions};

/// The most bytes of holder metadata an acquisition records (see
/// [`AcquireOptions::metadata`](crate::AcquireOptions::metadata)).
pub const MAX_METADATA_LEN: usize = 255;

/// One lock as inspection finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock key, as callers name it.
    pub key: String,
    /// Free, held, or reserved for a waiting process.
    pub state: LockState,
    /// How many wait for it: processes queued in Redis (each process queues
    /// once, however many of its calls wait), calls in the in-memory
    /// provider.
    pub waiting: u64,
}

impl LockInfo {
    /// What a provider reports of `key`.
    pub fn new(key: impl Into<String>, state: LockState, waiting: u64) -> Self {
        LockInfo {
            key: key.into(),
            state,
            waiting,
        }
    }

    /// The holder, if the lock is held.
    pub fn holder(&self) -> Option<&LockHolder> {
        match &self.state {
            LockState::Held(h) => Some(h),
            _ => None,
        }
    }
}

/// Whether a lock is held.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockState {
    /// Nobody holds it.
    Free,
    /// Held.
    Held(LockHolder),
    /// Released to a waiting process, which has not claimed it yet (a
    /// hand-over in flight); it lapses after `lease_left` if never claimed.
    Reserved {
        /// How long the reservation lasts unclaimed.
        lease_left: Option<Duration>,
    },
}

/// Who holds a lock, since when, and for how long more.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockHolder {
    /// The owner; `None` for an anonymous lock.
    pub owner: Option<String>,
    /// The fencing token the holder got, the newest if it re-entered. (A
    /// Redlock set reports the highest of its agreeing masters' tokens,
    /// which is at least the holder's.)
    pub fencing_token: u64,
    /// When the lock was taken, by the backend's clock (Redis: the
    /// server's), not re-entries.
    pub acquired_at: SystemTime,
    /// How long it has been held, by the same clock.
    pub held_for: Duration,
    /// The lease left; `None` for a lock without expiry.
    pub lease_left: Option<Duration>,
    /// What the holder recorded about itself, if anything.
    pub metadata: Option<String>,
}

impl LockHolder {
    /// A holder that took the lock at `acquired_at` and has held it for
    /// `held_for`, by the backend's clock; no lease, no metadata.
    pub fn new(
        owner: Option<String>,
        fencing_token: u64,
        acquired_at: SystemTime,
        held_for: Duration,
    ) -> Self {
        LockHolder {
            owner,
            fencing_token,
            acquired_at,
            held_for,
            lease_left: None,
            metadata: None,
        }
    }

    /// With the lease left.
    pub fn with_lease_left(mut self, lease_left: Option<Duration>) -> Self {
        self.lease_left = lease_left;
        self
    }

    /// With the holder's metadata.
    pub fn with_metadata(mut self, metadata: Option<String>) -> Self {
        self.metadata = metadata;
        self
    }
}

impl LockingModule {
    /// Who holds each key, since when, with which token and lease, and how
    /// many wait: one [`LockInfo`] per key, in order. Reads only.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lockstep::LockError> {
    /// use lockstep::{AcquireOptions, InspectOptions, LockingModule};
    ///
    /// let locking = LockingModule::new();
    /// let lease = locking
    ///     .acquire("order_1", AcquireOptions::new().owner_id("run-1").metadata("checkout"))
    ///     .await?;
    /// let info = locking.inspect("order_1", InspectOptions::new()).await?;
    /// let holder = info[0].holder().expect("held");
    /// assert_eq!(holder.owner.as_deref(), Some("run-1"));
    /// assert_eq!(holder.fencing_token, lease.fencing_token());
    /// assert_eq!(holder.metadata.as_deref(), Some("checkout"));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`LockError::InvalidInput`] for a bad key list,
    /// [`LockError::UnknownProvider`], [`LockError::Unsupported`] for a
    /// provider without inspection, [`LockError::Backend`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it changes nothing.
    pub async fn inspect(
        &self,
        keys: impl Into<Keys>,
        options: InspectOptions,
    ) -> Result<Vec<LockInfo>, LockError> {
        let (_, provider) = self.route(options.provider.as_deref())?;
        let keys = keys.into().validated()?;
        provider.inspect(&keys).await
    }

    /// The held locks (and reservations) of a provider, oldest first,
    /// filtered by key prefix and owner. On Redis it scans the namespace in
    /// pages (`SCAN`, never `KEYS`), so it does not block the server, and
    /// sees each lock as it was when its page was read.
    ///
    /// # Errors
    ///
    /// [`LockError::UnknownProvider`], [`LockError::Unsupported`],
    /// [`LockError::Backend`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it changes nothing.
    pub async fn locks(&self, options: ListOptions) -> Result<Vec<LockInfo>, LockError> {
        let (_, provider) = self.route(options.provider.as_deref())?;
        let mut locks = provider.list(&options.prefix).await?;
        if let Some(owner) = &options.owner {
            locks.retain(|l| l.holder().is_some_and(|h| h.owner.as_ref() == Some(owner)));
        }
        // Oldest first; reservations (no holder) last, then by key.
        locks.sort_by(|a, b| {
            let at = |l: &LockInfo| l.holder().map(|h| h.acquired_at);
            match (at(a), at(b)) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
            .then_with(|| a.key.cmp(&b.key))
        });
        Ok(locks)
    }

    /// Frees the keys whoever holds them — an operator's tool for a lock
    /// whose holder is gone or stuck. Waiters are served as after a
    /// release. The old holder finds out: its next
    /// [`extend`](LockingModule::extend) fails with [`LockError::NotOwner`]
    /// and an `execute` job's loss signal fires at its next renewal; the
    /// next holder's fencing token is higher, so a store that checks tokens
    /// refuses the old holder's late writes. Returns, per key, what was
    /// freed (`None`: it was free). Each freed lock is logged as a `warn`
    /// event (`lockstep.force_release`).
    ///
    /// # Errors
    ///
    /// [`LockError::InvalidInput`], [`LockError::UnknownProvider`],
    /// [`LockError::Unsupported`], [`LockError::Backend`].
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, some keys may have been freed; it can be
    /// repeated.
    pub async fn force_release(
        &self,
        keys: impl Into<Keys>,
        options: InspectOptions,
    ) -> Result<Vec<Option<LockInfo>>, LockError> {
        let (id, provider) = self.route(options.provider.as_deref())?;
        let keys = keys.into().validated()?;
        let freed = provider.force_release(&keys).await?;
        for info in freed.iter().flatten() {
            if let Some(h) = info.holder() {
                tracing::warn!(
                    target: "lockstep.force_release",
                    provider = id,
                    key = %info.key,
                    owner = h.owner.as_deref().unwrap_or("(anonymous)"),
                    fencing_token = h.fencing_token,
                    held_for_ms = h.held_for.as_millis() as u64,
                    "lock force-released"
                );
            }
        }
        Ok(freed)
    }
}

/// Checks caller metadata: at most [`MAX_METADATA_LEN`] bytes, no control
/// characters (they would garble a terminal's `lockstep locks list`).
pub(crate) fn validate_metadata(m: &str) -> Result<(), InvalidInput> {
    if m.len() > MAX_METADATA_LEN {
        return Err(InvalidInput::MetadataTooLong {
            len: m.len(),
            max: MAX_METADATA_LEN,
        });
    }
    if m.chars().any(char::is_control) {
        return Err(InvalidInput::ControlInMetadata);
    }
    Ok(())
}

/// `host=<name> pid=<pid>`, this process's description when the module
/// records holders (see
/// [`LockingModuleBuilder::record_holder`](crate::LockingModuleBuilder::record_holder)).
pub(crate) fn this_process() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.len() <= 64 && !h.chars().any(char::is_control))
        .unwrap_or_else(|| "unknown".into());
    format!("host={host} pid={}", std::process::id())
}

/// The metadata an acquisition records: the process's description if
/// recorded, then the caller's, cut to [`MAX_METADATA_LEN`] on a character
/// boundary.
pub(crate) fn combine(process: Option<&str>, call: Option<&str>) -> Option<String> {
    let mut m = match (process, call) {
        (None, None) => return None,
        (Some(p), None) => p.to_owned(),
        (None, Some(c)) => c.to_owned(),
        (Some(p), Some(c)) => format!("{p} {c}"),
    };
    if m.len() > MAX_METADATA_LEN {
        let mut end = MAX_METADATA_LEN;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_bounded_and_printable() {
        assert!(validate_metadata("label=nightly").is_ok());
        assert!(validate_metadata(&"x".repeat(MAX_METADATA_LEN)).is_ok());
        assert!(matches!(
            validate_metadata(&"x".repeat(MAX_METADATA_LEN + 1)),
            Err(InvalidInput::MetadataTooLong { .. })
        ));
        assert_eq!(
            validate_metadata("a\nb"),
            Err(InvalidInput::ControlInMetadata)
        );
    }

    #[test]
    fn the_process_description_names_host_and_pid() {
        let d = this_process();
        assert!(d.starts_with("host=") && d.ends_with(&format!("pid={}", std::process::id())));
        assert!(validate_metadata(&d).is_ok());
    }

    #[test]
    fn combined_metadata_stays_within_the_limit() {
        assert_eq!(combine(None, None), None);
        assert_eq!(combine(Some("p"), Some("c")).as_deref(), Some("p c"));
        let long = combine(Some("host=h pid=1"), Some(&"é".repeat(200))).unwrap();
        assert!(long.len() <= MAX_METADATA_LEN);
    }
}
