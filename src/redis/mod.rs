//! The Redis provider: locks shared by every process that uses one Redis.
//!
//! # Layout
//!
//! - `mod.rs`: [`RedisProvider`], its state, and its [`LockingProvider`]
//!   impl as one-line delegations.
//! - `config.rs` ([`RedisConfig`]); `connect.rs`: startup (URL and TLS,
//!   pool, scripts loaded, the subscription started).
//! - `topology.rs`: one server or a cluster ([`Deployment`], the shared
//!   connection's source), and the one place each operation splits on it.
//! - `connection.rs`: the shared multiplexed connection; `error.rs`: what
//!   each Redis failure means.
//! - `layout.rs`: key names and hash tags; `keyset.rs`: a request's keys;
//!   `wire.rs`: nonces, the clock, milliseconds, redacted URLs.
//! - `scripts/`: the Lua scripts of `lua/`, one binding each (ARGV by name,
//!   the reply decoded).
//! - `acquire/`: an acquisition and its undo guard (`mod.rs`), the ways of
//!   waiting (`wait.rs`), replica acknowledgement (`replicas.rs`).
//! - `release.rs`, `extend.rs`, `release_all.rs`: the other operations;
//!   `inspect.rs`: inspection, listing (`SCAN`) and force-release;
//!   `nonce.rs`: acquisition-level calls (by nonce) that a Redlock set
//!   builds on.
//! - `waiting/`: the registry of local waiters (`mod.rs`), one waiter and a
//!   withdraw in flight (`waiter.rs`), the notification subscription
//!   (`subscription.rs`).
//! - `sentinel.rs` (feature `sentinel`), `cluster/` (feature `cluster`).

mod acquire;
#[cfg(feature = "cluster")]
mod cluster;
pub(crate) mod config;
pub(crate) mod connect;
mod connection;
mod error;
mod extend;
mod inspect;
mod keyset;
mod layout;
mod nonce;
mod release;
mod release_all;
mod scripts;
#[cfg(feature = "sentinel")]
mod sentinel;
mod topology;
mod waiting;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;

pub use config::{DEFAULT_NAMESPACE, ENV_URL, RedisConfig};
pub use topology::Deployment;

use crate::error::{ConfigError, LockError};
use crate::inspect::LockInfo;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider};
use connection::Connections;
use layout::Layout;
use topology::Topology;
use waiting::Waiting;

/// Locks in Redis, shared by every process that uses the same server and
/// namespace.
///
/// - **Atomic.** Each operation is one Lua script (`lua/` in the
///   repository), so a multi-key acquisition takes all keys or none, and
///   ownership checks cannot race with expiry.
/// - **Waiting without polling.** Waiters are woken by the release of the
///   lock they wait for (or by its lease running out), and served in arrival
///   order: a release hands the lock to the next waiter, often in the same
///   round trip. Each process keeps one subscription and queues its own
///   waiters locally, so many local waiters cost Redis nothing more than
///   one. See [`RedisConfig::notifications`] and [`RedisConfig::fair`].
/// - **Connections.** All operations share one multiplexed connection,
///   supplied by a deadpool pool and replaced after a failure; nothing holds
///   a pooled connection while waiting. [`shutdown`](LockingProvider::shutdown)
///   closes them.
/// - **Failures.** Every call is bounded by the response timeout. A call
///   whose reply did not arrive has an *unknown outcome*; an acquisition in
///   that state is undone (its keys released by this acquisition's nonce, so
///   nothing the caller held before is touched) before the error reaches
///   the caller, or in the background if Redis is still unreachable.
/// - **Key layout** (cluster-ready hash tags, bounded fencing state): see
///   `docs/redis-internals.md` in the repository.
///
/// Clones share the connection.
#[derive(Clone)]
pub struct RedisProvider {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Connections,
    /// One server or a cluster: how each operation is carried out.
    topology: Topology,
    layout: Layout,
    wait_timeout: Duration,
    /// The URL without its password, for messages.
    url: String,
    /// The notification channel and local waiters; `None` when polling.
    waiting: Option<Arc<Waiting>>,
    fair: bool,
    /// How long a lock reserved for a waiting process stays reserved.
    claim_ms: u64,
    response_timeout: Duration,
    /// The longest a waiter sleeps without news.
    fallback: Duration,
    /// Replicas that must acknowledge an acquisition, and for how long to wait.
    replicas: (usize, Duration),
    /// The client for the current master: the subscription reconnects with it.
    client: std::sync::RwLock<Option<redis::Client>>,
    /// Fired when the master moved, so that the subscription follows.
    moved: Arc<tokio::sync::Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(w) = &self.waiting {
            w.stop.cancel();
        }
    }
}

impl RedisProvider {
    /// Connects to Redis as configured: checks the settings, opens the
    /// first connection (with AUTH when the URL has credentials), pings,
    /// loads the scripts and subscribes to this process's notification
    /// channel, all within the connect timeout.
    ///
    /// # Errors
    ///
    /// [`ConfigError::MissingUrl`], [`ConfigError::InvalidUrl`],
    /// [`ConfigError::InvalidSetting`], [`ConfigError::Unreachable`] (no
    /// answer within the connect timeout), [`ConfigError::AuthFailed`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves nothing behind but, at most, a
    /// subscription task that ends with the dropped provider.
    pub async fn connect(config: RedisConfig) -> Result<Self, ConfigError> {
        config.check()?;
        match &config.deployment {
            Deployment::Server => {
                let (provider, client) = connect::single(&config, true)?;
                provider.start_io(Some(client), &config).await?;
                Ok(provider)
            }
            #[cfg(feature = "cluster")]
            Deployment::Cluster { nodes } => cluster::connect(nodes, &config).await,
            #[cfg(feature = "sentinel")]
            Deployment::Sentinel { sentinels, master } => {
                sentinel::connect(sentinels, master, &config).await
            }
        }
    }

    /// Connects using the environment (see [`RedisConfig::from_env`]).
    ///
    /// # Errors
    ///
    /// As [`RedisConfig::from_env`] and [`RedisProvider::connect`].
    ///
    /// # Cancel safety
    ///
    /// As [`RedisProvider::connect`].
    pub async fn from_env() -> Result<Self, ConfigError> {
        Self::connect(RedisConfig::from_env()?).await
    }

    /// Uses an existing deadpool pool; `config.pool_size` is not used. The
    /// pool's own connection settings apply (redis-rs defaults to a 500 ms
    /// response timeout); lockstep's response timeout bounds every call as
    /// well. Release notifications need a connection of their own, which a
    /// pool cannot lend for good: they are on when `config.url` names the
    /// same server, otherwise waiters poll.
    ///
    /// # Errors
    ///
    /// As [`RedisProvider::connect`].
    ///
    /// # Cancel safety
    ///
    /// As [`RedisProvider::connect`].
    pub async fn from_pool(pool: Pool, config: &RedisConfig) -> Result<Self, ConfigError> {
        config.check()?;
        let client = match config.url.as_deref() {
            Some(url) => Some(connect::client_for(url, config)?),
            None => None,
        };
        connect::start(
            topology::Source::single(pool),
            Topology::Single,
            client,
            config,
            "the given pool".to_owned(),
        )
        .await
    }

    /// This process's pid in queues and channel names (`""` when polling).
    fn pid(&self) -> &str {
        self.inner.waiting.as_ref().map_or("", |w| w.pid.as_str())
    }

    /// The process's channel prefix (`""` when polling).
    fn channel_prefix(&self) -> &str {
        self.inner
            .waiting
            .as_ref()
            .map_or("", |w| w.channel_prefix.as_str())
    }

    /// The Redis keys of the locks `keys`.
    pub(crate) fn lock_keys(&self, keys: &[String]) -> Vec<String> {
        keys.iter().map(|k| self.inner.layout.lock_key(k)).collect()
    }
}

/// Diagnostics: for operators, health checks, tests and the bench.
impl RedisProvider {
    /// The key namespace.
    pub fn namespace(&self) -> &str {
        self.inner.layout.namespace()
    }

    /// The pool connections come from (a handle: pools are cheap to clone);
    /// `None` on a Redis Cluster.
    pub fn pool(&self) -> Option<Pool> {
        self.inner.conns.pool()
    }

    /// The Redis key that holds the lock `key`.
    pub fn lock_key(&self, key: &str) -> String {
        self.inner.layout.lock_key(key)
    }

    /// How many requests (round trips) this provider has sent to Redis on
    /// its shared connection: one per script call, retries included. The
    /// subscription's own traffic is not counted.
    pub fn round_trips(&self) -> u64 {
        self.inner.conns.sent()
    }

    /// Whether the scripts run as lockstep's function library (`FCALL`) on
    /// this server, rather than by `EVALSHA`: true where the server has
    /// functions (Redis 7 and later), the user may load them, and
    /// [`RedisConfig::functions`](crate::RedisConfig::functions) is on.
    pub fn runs_functions(&self) -> bool {
        self.inner
            .conns
            .functions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many locks this process's waiter registry tracks: locks some
    /// local call waits for, or whose queue entry is being withdrawn. Zero
    /// once every wait has ended and Redis answered the withdraws.
    pub fn waiting_locks(&self) -> usize {
        self.inner.waiting.as_ref().map_or(0, |w| w.tracked())
    }

    /// Whether release notifications are currently being received.
    pub fn is_notified(&self) -> bool {
        self.inner
            .waiting
            .as_ref()
            .is_some_and(|w| w.is_subscribed())
    }

    /// A `PING` on the shared connection (on a cluster, to one node): a
    /// health check.
    ///
    /// # Errors
    ///
    /// [`LockError::Backend`] when Redis does not answer within the
    /// response timeout; [`LockError::Shutdown`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a PING changes nothing.
    pub async fn ping(&self) -> Result<(), LockError> {
        self.inner.conns.check_open()?;
        self.inner
            .conns
            .run("ping", |mut conn| async move {
                redis::cmd("PING").query_async::<()>(&mut conn).await
            })
            .await
    }
}

impl std::fmt::Debug for RedisProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProvider")
            .field("url", &self.inner.url)
            .field("namespace", &self.inner.layout.namespace())
            .field("wait_timeout", &self.inner.wait_timeout)
            .finish_non_exhaustive()
    }
}

impl LockingProvider for RedisProvider {
    fn identifier(&self) -> &'static str {
        "locking-redis"
    }

    fn default_wait_timeout(&self) -> Duration {
        self.inner.wait_timeout
    }

    fn acquire<'a>(
        &'a self,
        request: &'a AcquireRequest,
    ) -> BoxFuture<'a, Result<Acquired, LockError>> {
        Box::pin(self.acquire_inner(request))
    }

    fn release<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<bool>, LockError>> {
        Box::pin(self.release_inner(keys, owner))
    }

    fn extend<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), LockError>> {
        Box::pin(self.extend_inner(keys, owner, lease))
    }

    fn release_all<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, LockError>> {
        Box::pin(self.release_all_inner(owner))
    }

    fn inspect<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(self.inspect_inner(keys))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(self.list_inner(prefix))
    }

    fn force_release<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<LockInfo>>, LockError>> {
        Box::pin(self.force_release_inner(keys))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(w) = &self.inner.waiting {
                w.stop.cancel();
            }
            self.inner.conns.close()
        })
    }
}
