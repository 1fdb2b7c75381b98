//! Per-call options, mirroring Medusa's `{ ownerId, expire, timeout, provider }`.
//!
//! Durations are [`Duration`]s with millisecond precision (sub-millisecond
//! parts are rounded up). A zero `timeout` means "try once"; there is no
//! silent clamp to one second as in Medusa.

use std::time::Duration;

use crate::error::InvalidInput;

/// The longest lease, wait or renewal interval accepted: 365 days. Longer
/// values get [`InvalidInput::DurationTooLong`]; they are almost always a
/// unit mistake. A lock that should never expire is taken without `expire`,
/// and a wait without end uses `wait_forever()`.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The lease of [`LockingModule::execute`](crate::LockingModule::execute)
/// when no `expire` is given (Medusa's default).
pub const DEFAULT_EXECUTE_LEASE: Duration = Duration::from_secs(60);

/// The wait of `execute` when neither the call nor the provider sets one
/// (Medusa's default).
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks a lease length.
pub(crate) fn check_lease(what: &'static str, d: Duration) -> Result<Duration, InvalidInput> {
    if d.is_zero() {
        return Err(InvalidInput::ZeroDuration { what });
    }
    check_max(what, d)
}

/// Checks a duration against [`MAX_DURATION`].
pub(crate) fn check_max(what: &'static str, d: Duration) -> Result<Duration, InvalidInput> {
    if d > MAX_DURATION {
        return Err(InvalidInput::DurationTooLong {
            what,
            value: d,
            max: MAX_DURATION,
        });
    }
    Ok(d)
}

/// How long an acquisition may wait, as the caller asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Patience {
    /// Use the default of the operation.
    #[default]
    Default,
    /// Wait up to this long; zero means one attempt.
    For(Duration),
    /// Wait until the locks are free.
    Forever,
}

/// Options of [`LockingModule::acquire`](crate::LockingModule::acquire).
///
/// ```
/// use std::time::Duration;
/// use lockstep::AcquireOptions;
/// let options = AcquireOptions::new()
///     .owner_id("order-workflow-42")
///     .expire(Duration::from_secs(10))
///     .timeout(Duration::from_secs(2));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default)]
pub struct AcquireOptions {
    pub(crate) owner_id: Option<String>,
    pub(crate) expire: Option<Duration>,
    pub(crate) patience: Patience,
    pub(crate) provider: Option<String>,
    pub(crate) metadata: Option<String>,
}

impl AcquireOptions {
    /// No owner (an anonymous lock), no expiry, one attempt, the default provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// The owner. The same owner may acquire its lock again (re-entry, not
    /// counted: one release frees it) and only it may release or extend it.
    /// Without an owner the lock is anonymous: never re-entrant, and
    /// released by any caller that gives no owner.
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.owner_id = Some(owner.into());
        self
    }

    /// The lease: the lock expires this long after it was taken unless it is
    /// extended. Without it the lock never expires (as in Medusa). On
    /// re-entry, a given `expire` resets the lease; without one the current
    /// lease (or none) is kept.
    pub fn expire(mut self, lease: Duration) -> Self {
        self.expire = Some(lease);
        self
    }

    /// How long to wait for locks held by others. Without it, or with zero,
    /// the acquisition is a single attempt that fails with
    /// [`LockError::Contended`](crate::LockError::Contended) (Medusa's
    /// `acquire`); otherwise it fails with
    /// [`LockError::TimedOut`](crate::LockError::TimedOut) at the deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.patience = Patience::For(timeout);
        self
    }

    /// Wait as long as it takes.
    pub fn wait_forever(mut self) -> Self {
        self.patience = Patience::Forever;
        self
    }

    /// A description of the holder that [`inspect`](crate::LockingModule::inspect)
    /// and `lockstep locks list` show (a job name, a deploy id): at most
    /// [`MAX_METADATA_LEN`](crate::MAX_METADATA_LEN) bytes, no control
    /// characters. Recorded when the lock is taken, after the process's
    /// description if the module records holders
    /// ([`LockingModuleBuilder::record_holder`](crate::LockingModuleBuilder::record_holder)).
    pub fn metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// The id of the provider to use instead of the module's default.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }
}

/// Options of [`LockingModule::execute`](crate::LockingModule::execute).
#[derive(Debug, Clone, Default)]
pub struct ExecuteOptions {
    pub(crate) expire: Option<Duration>,
    pub(crate) patience: Patience,
    pub(crate) provider: Option<String>,
    pub(crate) metadata: Option<String>,
}

impl ExecuteOptions {
    /// Lease 60 s, the provider's wait timeout (5 s unless configured), the
    /// default provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lease, renewed every third of it while the job runs (default 60 s).
    pub fn expire(mut self, lease: Duration) -> Self {
        self.expire = Some(lease);
        self
    }

    /// How long to wait for the locks (default: the provider's wait timeout,
    /// 5 s unless configured). Zero means one attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.patience = Patience::For(timeout);
        self
    }

    /// Wait as long as it takes.
    pub fn wait_forever(mut self) -> Self {
        self.patience = Patience::Forever;
        self
    }

    /// A description of the holder that [`inspect`](crate::LockingModule::inspect)
    /// and `lockstep locks list` show (a job name, a deploy id): at most
    /// [`MAX_METADATA_LEN`](crate::MAX_METADATA_LEN) bytes, no control
    /// characters. Recorded when the lock is taken, after the process's
    /// description if the module records holders
    /// ([`LockingModuleBuilder::record_holder`](crate::LockingModuleBuilder::record_holder)).
    pub fn metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// The id of the provider to use instead of the module's default.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }
}

/// Options of [`LockingModule::release`](crate::LockingModule::release) and
/// [`LockingModule::release_all`](crate::LockingModule::release_all).
#[derive(Debug, Clone, Default)]
pub struct ReleaseOptions {
    pub(crate) owner_id: Option<String>,
    pub(crate) provider: Option<String>,
}

impl ReleaseOptions {
    /// No owner: only anonymous locks are released (and, for `release_all`,
    /// every lock of the provider).
    pub fn new() -> Self {
        Self::default()
    }

    /// Release only locks held by this owner.
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.owner_id = Some(owner.into());
        self
    }

    /// The id of the provider to use instead of the module's default.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }
}

/// Options of [`LockingModule::extend`](crate::LockingModule::extend).
#[derive(Debug, Clone)]
pub struct ExtendOptions {
    pub(crate) expire: Duration,
    pub(crate) owner_id: Option<String>,
    pub(crate) provider: Option<String>,
}

impl ExtendOptions {
    /// Set the lease of the locks to `expire` from now.
    pub fn new(expire: Duration) -> Self {
        ExtendOptions {
            expire,
            owner_id: None,
            provider: None,
        }
    }

    /// The owner that must hold the locks (none: anonymous locks).
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.owner_id = Some(owner.into());
        self
    }

    /// The id of the provider to use instead of the module's default.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }
}

/// Options of [`LockingModule::inspect`](crate::LockingModule::inspect) and
/// [`LockingModule::force_release`](crate::LockingModule::force_release).
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    pub(crate) provider: Option<String>,
}

impl InspectOptions {
    /// The default provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the provider to use instead of the module's default.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }
}

/// Options of [`LockingModule::locks`](crate::LockingModule::locks).
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub(crate) prefix: String,
    pub(crate) owner: Option<String>,
    pub(crate) provider: Option<String>,
}

impl ListOptions {
    /// Every held lock of the default provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys that start with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Only locks held by this owner.
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The id of the provider to use instead of the module's default.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_checked() {
        assert!(check_lease("expire", Duration::ZERO).is_err());
        assert!(check_lease("expire", MAX_DURATION).is_ok());
        assert!(check_lease("expire", MAX_DURATION + Duration::from_millis(1)).is_err());
        assert!(check_lease("expire", Duration::MAX).is_err());
    }
}
