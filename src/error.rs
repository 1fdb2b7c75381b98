//! The crate's error types.
//!
//! [`LockError`] is what every lock operation returns. It keeps *outcomes*
//! (the lock is held by someone else, the wait timed out, the lease was lost,
//! the caller does not own the lock, the input was invalid) apart from
//! *backend failures* ([`LockError::Backend`]): an outcome is an answer, a
//! backend failure means there was no answer. The Display texts of the
//! outcomes are Medusa's, so logs and alerts written for Medusa keep matching.
//!
//! [`ConfigError`] is what building a provider or a module returns.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// What kind of server a URL in a message names: PostgreSQL for
/// `postgres://` and `postgresql://`, else Redis.
fn server_kind(url: &str) -> &'static str {
    if url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "Redis"
    }
}

/// A boxed error, used as the `source()` of backend failures.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error of a lock operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The lock is held by another owner (or anonymously) and the request
    /// was a single attempt. Nothing was acquired.
    #[error("Failed to acquire lock for key \"{key}\"")]
    Contended {
        /// The first requested key that was held.
        key: String,
    },

    /// The wait for the locks ended at its deadline. Nothing was acquired.
    #[error("Timed-out acquiring lock.")]
    TimedOut {
        /// A key that was still held when the deadline passed.
        key: String,
    },

    /// A lease was lost while its holder still relied on it: a renewal found
    /// the lock gone or held by someone else, or renewals failed until the
    /// lease ran out.
    #[error("Lost the lock for key(s) {}", .keys.join(", "))]
    LeaseLost {
        /// The keys of the lost lease.
        keys: Vec<String>,
    },

    /// An owner-checked operation found the lock absent, expired or held by
    /// someone else. Nothing was changed.
    #[error("The lock for key \"{key}\" is not held by this owner")]
    NotOwner {
        /// The first key that was not held by the owner.
        key: String,
    },

    /// No provider is registered under this id.
    #[error(
        "Unable to retrieve the locking provider with id: {id}\nPlease make sure that the provider is registered in the container and it is configured correctly in your project configuration file."
    )]
    UnknownProvider {
        /// The id that was asked for.
        id: String,
    },

    /// The request was rejected before anything was sent or locked.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),

    /// A lock key holds a value lockstep did not write (for example a hash
    /// stored under the same Redis key by another program). Nothing was
    /// changed.
    #[error(
        "the lock key for \"{key}\" holds a value of another type; lockstep will not overwrite it"
    )]
    ForeignValue {
        /// The lock key as the caller named it.
        key: String,
    },

    /// The backend (Redis) failed or did not answer in time.
    #[error(transparent)]
    Backend(#[from] BackendError),

    /// The provider was shut down.
    #[error("the locking provider \"{provider}\" has been shut down")]
    Shutdown {
        /// The provider's identifier.
        provider: String,
    },
    /// The provider does not implement this operation (a provider written
    /// before it existed: the trait's default).
    #[error("the locking provider \"{provider}\" does not support {operation}")]
    Unsupported {
        /// The provider's identifier.
        provider: String,
        /// The operation, e.g. `"inspect"`.
        operation: &'static str,
    },
}

impl LockError {
    /// True when the lock is held by someone else: [`LockError::Contended`]
    /// or [`LockError::TimedOut`]. Such a call may be retried later.
    pub fn is_contended(&self) -> bool {
        matches!(
            self,
            LockError::Contended { .. } | LockError::TimedOut { .. }
        )
    }

    /// True when the lease is gone: [`LockError::LeaseLost`] or
    /// [`LockError::NotOwner`]. Work guarded by it must stop.
    pub fn is_lost(&self) -> bool {
        matches!(
            self,
            LockError::LeaseLost { .. } | LockError::NotOwner { .. }
        )
    }

    /// True for failures of the backend itself, as opposed to answers.
    pub fn is_backend(&self) -> bool {
        matches!(self, LockError::Backend(_))
    }

    /// True when a request may have taken effect although no reply arrived
    /// (see [`BackendError::is_outcome_unknown`]).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, LockError::Backend(e) if e.is_outcome_unknown())
    }

    /// True for backend failures that pass by themselves (see
    /// [`BackendError::is_transient`]): the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, LockError::Backend(e) if e.is_transient())
    }
}

/// Why a request was rejected before anything was locked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// The key list was empty.
    #[error("invalid input: the key list is empty")]
    NoKeys,
    /// A key was the empty string.
    #[error("invalid input: a lock key is empty")]
    EmptyKey,
    /// A key was longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes.
    #[error("invalid input: a lock key is {len} bytes long; the limit is {max} bytes")]
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More keys than [`MAX_KEYS`](crate::MAX_KEYS) in one request.
    #[error("invalid input: {count} keys in one request; the limit is {max}")]
    TooManyKeys {
        /// The number of distinct keys.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An owner id was the empty string (use no owner for an anonymous lock).
    #[error("invalid input: the owner id is empty; pass no owner for an anonymous lock")]
    EmptyOwner,
    /// An owner id contained a NUL byte (lockstep marks lock reservations
    /// with one, so no owner may look like them).
    #[error("invalid input: the owner id contains a NUL byte")]
    NulInOwner,
    /// An owner id was longer than [`MAX_OWNER_LEN`](crate::MAX_OWNER_LEN) bytes.
    #[error("invalid input: the owner id is {len} bytes long; the limit is {max} bytes")]
    OwnerTooLong {
        /// The owner id's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Holder metadata was longer than
    /// [`MAX_METADATA_LEN`](crate::MAX_METADATA_LEN) bytes.
    #[error("invalid input: the holder metadata is {len} bytes long; the limit is {max} bytes")]
    MetadataTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Holder metadata contained a control character (a newline, say).
    #[error("invalid input: the holder metadata contains a control character")]
    ControlInMetadata,
    /// A duration was zero where a positive one is needed.
    #[error("invalid input: {what} must be greater than zero")]
    ZeroDuration {
        /// Which duration.
        what: &'static str,
    },
    /// A duration was above [`MAX_DURATION`](crate::MAX_DURATION).
    #[error("invalid input: {what} of {value:?} is above the limit of {max:?}")]
    DurationTooLong {
        /// Which duration.
        what: &'static str,
        /// The value given.
        value: Duration,
        /// The limit.
        max: Duration,
    },
}

/// What kind of backend failure a [`BackendError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// No connection could be made or the connection broke before the
    /// request was sent. The request had no effect.
    Unavailable,
    /// The request was sent but no reply arrived in time, or the connection
    /// broke while waiting: the request may or may not have taken effect.
    OutcomeUnknown,
    /// The server refused the credentials, or the user lacks a permission.
    Auth,
    /// The server answered with an error or with a reply lockstep did not
    /// expect.
    Server,
    /// An acquisition did not reach the required number of replicas in
    /// time (see `RedisConfig::replicas`); it was released again.
    NotReplicated,
}

/// A failure of the backend, with the backend's own error as its source.
///
/// Messages never contain credentials: URLs are shown without their password.
#[derive(Debug)]
pub struct BackendError {
    kind: BackendErrorKind,
    operation: &'static str,
    message: String,
    source: Option<BoxError>,
}

impl BackendError {
    pub(crate) fn new(
        kind: BackendErrorKind,
        operation: &'static str,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        BackendError {
            kind,
            operation,
            message: message.into(),
            source,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The operation that failed (`"acquire"`, `"release"`, ...).
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// True when the request may have taken effect although no reply
    /// arrived. lockstep undoes such acquisitions itself (see
    /// [`LockingProvider::acquire`](crate::provider::LockingProvider::acquire)); a
    /// release or extend with an unknown outcome can simply be repeated.
    pub fn is_outcome_unknown(&self) -> bool {
        self.kind == BackendErrorKind::OutcomeUnknown
    }

    /// True for failures that pass by themselves: no connection, no reply,
    /// replicas not caught up (as during a restart or a failover). Waiting
    /// acquisitions retry them until their deadline; `Auth` and `Server`
    /// errors are not retried.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            BackendErrorKind::Unavailable
                | BackendErrorKind::OutcomeUnknown
                | BackendErrorKind::NotReplicated
        )
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            BackendErrorKind::Unavailable => "backend unavailable",
            BackendErrorKind::OutcomeUnknown => "no reply from the backend (outcome unknown)",
            BackendErrorKind::Auth => "backend refused the credentials",
            BackendErrorKind::Server => "backend error",
            BackendErrorKind::NotReplicated => "not acknowledged by enough replicas",
        };
        write!(f, "{} failed: {what}: {}", self.operation, self.message)
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// The error of building a provider or a module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No Redis URL was configured.
    #[error(
        "No \"redisUrl\" provided in \"locking\" module, \"locking-redis\" provider options. It is required for the \"locking-redis\" Module provider. Set {env} or pass a URL such as redis://127.0.0.1:6379"
    )]
    MissingUrl {
        /// The environment variable that was read, if any.
        env: &'static str,
    },
    /// The Redis URL could not be used. The message never contains the
    /// password.
    #[error("invalid {} URL {url}: {reason}", server_kind(url))]
    InvalidUrl {
        /// The URL with its password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting had a value that cannot be used.
    #[error("invalid setting {name}: {reason}")]
    InvalidSetting {
        /// The setting's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached, or did not answer, within the connect
    /// timeout.
    #[error(
        "cannot reach {} at {url} within {timeout:?}: {reason}",
        server_kind(url)
    )]
    Unreachable {
        /// The URL with its password replaced by `***`.
        url: String,
        /// The connect timeout that applied.
        timeout: Duration,
        /// What happened.
        reason: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// Redis refused the credentials.
    #[error("{} at {url} refused the credentials: {reason}", server_kind(url))]
    AuthFailed {
        /// The URL with its password replaced by `***`.
        url: String,
        /// The server's answer.
        reason: String,
    },
    /// Two providers were registered under one id.
    #[error("two locking providers are registered with the id \"{id}\"")]
    DuplicateProvider {
        /// The id.
        id: String,
    },
    /// A provider was registered with an empty id.
    #[error("a locking provider was registered without an id")]
    MissingProviderId,
}

impl From<ConfigError> for LockError {
    /// A configuration failure met at run time is a backend failure: the
    /// lock service is not available.
    fn from(e: ConfigError) -> Self {
        let kind = match e {
            ConfigError::AuthFailed { .. } => BackendErrorKind::Auth,
            _ => BackendErrorKind::Unavailable,
        };
        LockError::Backend(BackendError::new(
            kind,
            "connect",
            e.to_string(),
            Some(Box::new(e)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_texts_are_medusas() {
        let e = LockError::Contended { key: "k".into() };
        assert_eq!(e.to_string(), "Failed to acquire lock for key \"k\"");
        let e = LockError::TimedOut { key: "k".into() };
        assert_eq!(e.to_string(), "Timed-out acquiring lock.");
        let e = LockError::LeaseLost {
            keys: vec!["a".into(), "b".into()],
        };
        assert_eq!(e.to_string(), "Lost the lock for key(s) a, b");
        let e = LockError::UnknownProvider { id: "x".into() };
        assert!(
            e.to_string()
                .starts_with("Unable to retrieve the locking provider with id: x\n")
        );
    }

    #[test]
    fn backend_error_chains_its_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = LockError::from(BackendError::new(
            BackendErrorKind::Unavailable,
            "acquire",
            "connection refused",
            Some(Box::new(io)),
        ));
        assert!(e.is_backend() && !e.is_outcome_unknown());
        let source = StdError::source(&e).expect("transparent: the BackendError's source");
        assert_eq!(source.to_string(), "refused");
    }

    #[test]
    fn predicates_sort_outcomes() {
        assert!(LockError::Contended { key: "k".into() }.is_contended());
        assert!(LockError::TimedOut { key: "k".into() }.is_contended());
        assert!(LockError::NotOwner { key: "k".into() }.is_lost());
        assert!(!LockError::from(InvalidInput::NoKeys).is_contended());
    }
}
