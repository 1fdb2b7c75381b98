//! The backend SPI: what a lock backend implements, and what the module
//! hands it.
//!
//! A user of lockstep never needs this module: [`LockingModule`](crate::LockingModule)
//! validates every call and passes the provider an [`AcquireRequest`]. To
//! write a backend of your own, implement [`LockingProvider`] (its docs list
//! the contract) and register it with
//! [`LockingModuleBuilder::provider`](crate::LockingModuleBuilder::provider);
//! the contract suite in the repository's `tests/contract/` is the test.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::LockError;
use crate::inspect::LockInfo;
use crate::options::DEFAULT_WAIT_TIMEOUT;

/// A boxed, sendable future, the return type of [`LockingProvider`] methods.
///
/// The module picks a provider by id at run time, so it holds
/// `Arc<dyn LockingProvider>` and the trait must be dyn-compatible: its
/// methods cannot be `async fn`. One allocation per call is noise next to a
/// network round trip.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// When an acquisition gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Wait {
    /// One attempt; a held lock fails with [`LockError::Contended`].
    Once,
    /// Wait until this instant, then fail with [`LockError::TimedOut`].
    Until(Instant),
    /// Wait as long as it takes.
    Forever,
}

impl Wait {
    /// The time left before the deadline, if any; zero once it has passed.
    pub fn remaining(&self) -> Option<Duration> {
        match self {
            Wait::Once => Some(Duration::ZERO),
            Wait::Until(at) => Some(at.saturating_duration_since(Instant::now())),
            Wait::Forever => None,
        }
    }

    /// The error for a lock still held by someone else when giving up.
    pub fn give_up(&self, key: &str) -> LockError {
        match self {
            Wait::Once => LockError::Contended {
                key: key.to_owned(),
            },
            _ => LockError::TimedOut {
                key: key.to_owned(),
            },
        }
    }
}

/// A validated acquisition request, as the module hands it to a provider.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcquireRequest {
    /// Distinct, non-empty keys, in the caller's order.
    pub keys: Vec<String>,
    /// The owner; `None` for an anonymous lock.
    pub owner: Option<String>,
    /// The lease; `None` for a lock that does not expire.
    pub expire: Option<Duration>,
    /// When to give up.
    pub wait: Wait,
    /// Whether `release_all` with this owner must find these locks. False
    /// for owners that never outlive one call (`execute`'s), so that a
    /// provider can skip its owner index.
    pub indexed: bool,
    /// The holder's description for [`inspect`](LockingProvider::inspect):
    /// at most [`MAX_METADATA_LEN`](crate::MAX_METADATA_LEN) bytes without
    /// control characters, or `None`.
    pub metadata: Option<String>,
}

/// What a successful acquisition returns, per key in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Acquired {
    /// The fencing token of each key.
    pub tokens: Vec<u64>,
    /// Whether each key was already held by the same owner (re-entry).
    pub reentered: Vec<bool>,
    /// When the successful attempt was sent: the lease runs from no earlier
    /// than this instant.
    pub sent_at: Instant,
}

impl Acquired {
    /// Builds the result of a successful acquisition.
    pub fn new(tokens: Vec<u64>, reentered: Vec<bool>, sent_at: Instant) -> Self {
        Acquired {
            tokens,
            reentered,
            sent_at,
        }
    }
}

/// A lock backend.
///
/// Every provider gives the same semantics, proven by one contract test
/// suite run against each:
///
/// - **All or nothing.** An acquisition takes every key of the request or
///   none; it never leaves a key half-held, also when it fails, times out or
///   is cancelled.
/// - **Ownership.** A named owner may re-acquire its own lock (not counted:
///   one release frees it). Anonymous locks (`owner == None`) are never
///   re-entrant, and only callers giving no owner release them.
/// - **Expiry.** A lock with a lease is free for anyone once the lease has
///   run out; a lock without one is held until released.
/// - **Fencing.** Every successful acquisition returns, per key, a token
///   strictly greater than any token returned before for that key.
pub trait LockingProvider: Send + Sync + fmt::Debug {
    /// The provider's kind, e.g. `"in-memory"` or `"locking-redis"` (Medusa's
    /// identifiers). The id it is registered under is the module's business.
    fn identifier(&self) -> &'static str;

    /// The wait of `execute` when the call sets none.
    fn default_wait_timeout(&self) -> Duration {
        DEFAULT_WAIT_TIMEOUT
    }

    /// Takes every key of the request, waiting as the request allows.
    ///
    /// # Errors
    ///
    /// [`LockError::Contended`] (single attempt) or [`LockError::TimedOut`]
    /// (deadline) when a key stays held by someone else,
    /// [`LockError::ForeignValue`], or a backend failure. A provider whose
    /// request may have taken effect without a reply must undo it before
    /// returning the error.
    ///
    /// # Cancel safety
    ///
    /// The future may be dropped at any await: the provider must then leave
    /// nothing held and nothing registered (undoing in the background what
    /// may have taken effect). The contract suite's `drop_` cases check it.
    fn acquire<'a>(
        &'a self,
        request: &'a AcquireRequest,
    ) -> BoxFuture<'a, Result<Acquired, LockError>>;

    /// Releases the keys held by `owner` (by no one in particular when
    /// `None`: anonymous locks only). Returns, per key, whether it was
    /// released.
    ///
    /// # Errors
    ///
    /// Backend failures only: a key not held by the owner is `false`.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened,
    /// and it can be repeated. A provider handing a released lock to a
    /// local waiter must let that waiter learn the outcome either way (it
    /// takes the lock, or the hand-off is undone): no waiter stays stuck.
    fn release<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<bool>, LockError>>;

    /// Sets the lease of every key to `lease` from now, if `owner` holds all
    /// of them; otherwise changes nothing.
    ///
    /// # Errors
    ///
    /// [`LockError::NotOwner`] naming the first key not held by the owner,
    /// or a backend failure.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the extension may or may not have
    /// happened: on one server for every key or for none, on a Redis
    /// Cluster per slot, with Redlock per master. The locks stay held
    /// either way, and it can be repeated.
    fn extend<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), LockError>>;

    /// Releases every lock of `owner`, or every lock of the provider when
    /// `None`. Returns how many were released.
    ///
    /// # Errors
    ///
    /// Backend failures.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the locks may or may not have been
    /// released; it can be repeated, and it leaves no waiter stuck.
    fn release_all<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, LockError>>;

    /// Stops background work and closes connections. Later calls fail with
    /// [`LockError::Shutdown`].
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the provider may be shut down or not yet;
    /// calling it again finishes the job.
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    /// Reports, per key in order, whether it is held, by whom, since when,
    /// with which token and lease, and how many wait. Reads only.
    ///
    /// # Errors
    ///
    /// Backend failures; [`LockError::Unsupported`] by default.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    fn inspect<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        let _ = keys;
        Box::pin(std::future::ready(Err(unsupported(
            self.identifier(),
            "inspect",
        ))))
    }

    /// Every held (or reserved) lock whose key starts with `prefix`, in no
    /// particular order. Must not block the backend while it scans (Redis:
    /// `SCAN` in pages, never `KEYS`).
    ///
    /// # Errors
    ///
    /// Backend failures; [`LockError::Unsupported`] by default.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        let _ = prefix;
        Box::pin(std::future::ready(Err(unsupported(
            self.identifier(),
            "list",
        ))))
    }

    /// Frees the keys whoever holds them, and serves their waiters as a
    /// release would. The old holder finds out at its next `extend` or
    /// renewal ([`LockError::NotOwner`]), and the next holder's token is
    /// higher. Returns, per key, the holder it freed (`None`: it was free).
    ///
    /// # Errors
    ///
    /// Backend failures; [`LockError::Unsupported`] by default.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the keys may or may not have been freed
    /// (on one server, per key, the holder goes and its waiters are served
    /// together; with Redlock, per master); it can be repeated. A local
    /// mark left behind holds this process's multi-key waiters back for at
    /// most the fallback period, never for good.
    fn force_release<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<LockInfo>>, LockError>> {
        let _ = keys;
        Box::pin(std::future::ready(Err(unsupported(
            self.identifier(),
            "force_release",
        ))))
    }
}

/// The error of an operation a provider does not implement.
fn unsupported(provider: &'static str, operation: &'static str) -> LockError {
    LockError::Unsupported {
        provider: provider.to_owned(),
        operation,
    }
}
