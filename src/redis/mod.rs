//! The Redis provider: locks shared by every process that uses one Redis.

mod acquire;
#[cfg(feature = "cluster")]
mod cluster;
mod config;
mod connection;
mod layout;
mod release;
mod scripts;
#[cfg(feature = "sentinel")]
mod sentinel;
#[cfg(feature = "cluster")]
mod shards;
mod waiting;

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, Value};

pub use config::{DEFAULT_NAMESPACE, ENV_URL, RedisConfig};

use crate::error::{BackendError, BackendErrorKind, ConfigError, LockError};
use crate::options::millis_ceil;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider};
use config::redact_url;
use connection::{Connections, RawError, Source, is_auth_error};
use layout::Layout;
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
///   the README.
///
/// Clones share the connection.
#[derive(Clone)]
pub struct RedisProvider {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Connections,
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
    /// On a cluster with notifications: the sharded subscriptions.
    #[cfg(feature = "cluster")]
    shards: std::sync::OnceLock<Arc<shards::Shards>>,
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
    pub async fn connect(config: RedisConfig) -> Result<Self, ConfigError> {
        #[cfg(feature = "cluster")]
        if !config.cluster_nodes.is_empty() {
            config.check()?;
            let client = cluster_client(&config)?.build().map_err(cluster_error)?;
            let label = format!("the cluster of {}", redact_url(&config.cluster_nodes[0]));
            let provider =
                Self::start(Source::Cluster(Box::new(client)), None, &config, label).await?;
            if let Some(waiting) = &provider.inner.waiting {
                // Release notifications by sharded pub/sub, on a cluster
                // connection of their own (RESP3, pushed to `rx`).
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let pubsub = cluster_client(&config)?
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .build()
                    .map_err(cluster_error)?;
                let shards = shards::Shards::new(
                    pubsub,
                    &provider.inner.layout,
                    waiting,
                    config.connect_timeout,
                );
                let _ = provider.inner.shards.set(Arc::clone(&shards));
                waiting.set_subscribed(true);
                let weak = Arc::downgrade(&provider.inner);
                tokio::spawn(shards::run(
                    Arc::downgrade(&shards),
                    Arc::clone(waiting),
                    rx,
                    move |key| {
                        // A reservation nobody here wants any more: pass it on.
                        if let Some(inner) = weak.upgrade() {
                            let provider = RedisProvider { inner };
                            tokio::spawn(async move { provider.withdraw(&key, false).await });
                        }
                    },
                ));
            }
            return Ok(provider);
        }
        #[cfg(feature = "sentinel")]
        if config.sentinel_master.is_some() {
            config.check()?;
            return sentinel::connect(config).await;
        }
        let (pool, client, url) = Self::pool_for(&config)?;
        Self::start(Source::single(pool), Some(client), &config, url).await
    }

    /// The pool and client for `config.url`, without any I/O.
    fn pool_for(config: &RedisConfig) -> Result<(Pool, redis::Client, String), ConfigError> {
        config.check()?;
        let url = config
            .url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingUrl { env: ENV_URL })?;
        let client = client_for(url, config)?;
        let pool = Self::pool_from(client.get_connection_info().clone(), config, url)?;
        Ok((pool, client, redact_url(url)))
    }

    /// A pool of connections to `info`, with `config`'s timeouts and size.
    fn pool_from(
        info: redis::ConnectionInfo,
        config: &RedisConfig,
        url: &str,
    ) -> Result<Pool, ConfigError> {
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        let manager = Manager::new_with_config(info, connection_config).map_err(|e| {
            ConfigError::InvalidUrl {
                url: redact_url(url),
                reason: e.to_string(),
            }
        })?;
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.response_timeout))
            .build()
            .map_err(|e| ConfigError::InvalidSetting {
                name: "pool",
                reason: e.to_string(),
            })?;
        Ok(pool)
    }

    /// A provider for `config.url` that connects on first use, without
    /// notifications (waiters poll): one master of a Redlock set, which must
    /// be usable while some of its masters are down.
    #[cfg(feature = "redlock")]
    pub(crate) fn connect_lazily(config: &RedisConfig) -> Result<Self, ConfigError> {
        let (pool, _client, url) = Self::pool_for(config)?;
        Ok(Self::build(Source::single(pool), config, url, None))
    }

    fn build(
        source: Source,
        config: &RedisConfig,
        url: String,
        waiting: Option<Arc<Waiting>>,
    ) -> Self {
        RedisProvider {
            inner: Arc::new(Inner {
                conns: Connections::new(source, config.connect_timeout, config.response_timeout),
                layout: Layout::new(&config.namespace),
                wait_timeout: config.wait_timeout,
                url,
                waiting,
                fair: config.fair,
                claim_ms: (2 * config.response_timeout.as_millis() as u64).max(200),
                response_timeout: config.response_timeout,
                fallback: config.wait_fallback,
                replicas: (config.replicas, config.replica_timeout),
                client: std::sync::RwLock::new(None),
                moved: Arc::new(tokio::sync::Notify::new()),
                #[cfg(feature = "cluster")]
                shards: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Connects using the environment (see [`RedisConfig::from_env`]).
    ///
    /// # Errors
    ///
    /// As [`RedisConfig::from_env`] and [`RedisProvider::connect`].
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
    pub async fn from_pool(pool: Pool, config: &RedisConfig) -> Result<Self, ConfigError> {
        config.check()?;
        let client = match config.url.as_deref() {
            Some(url) => Some(client_for(url, config)?),
            None => None,
        };
        Self::start(
            Source::single(pool),
            client,
            config,
            "the given pool".to_owned(),
        )
        .await
    }

    async fn start(
        source: Source,
        client: Option<redis::Client>,
        config: &RedisConfig,
        url: String,
    ) -> Result<Self, ConfigError> {
        // One server: a subscription on the client's connection. A cluster:
        // sharded subscriptions, set up by `connect` (see shards.rs).
        let notified = client.is_some() || !matches!(source, Source::Pool(_));
        let waiting = (config.notifications && notified).then(|| Waiting::new(&config.namespace));
        let provider = Self::build(source, config, url, waiting);
        let unreachable =
            |reason: String, source: Option<redis::RedisError>| ConfigError::Unreachable {
                url: provider.inner.url.clone(),
                timeout: config.connect_timeout,
                reason,
                source: source.map(|e| Box::new(e) as _),
            };
        let startup = async {
            let (_, mut conn) = provider.inner.conns.get().await?;
            // PING alone first: its error (NOAUTH, WRONGPASS) is the one
            // to report, not a pipeline's summary of it.
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(RawError::Redis)?;
            if provider.inner.conns.is_cluster() {
                // One by one: SCRIPT LOAD goes to every node of a cluster,
                // which a pipeline cannot route.
                for script in scripts::all() {
                    script
                        .load_async(&mut conn)
                        .await
                        .map_err(RawError::Redis)?;
                }
            } else {
                let mut pipe = redis::pipe();
                for script in scripts::all() {
                    pipe.load_script(script).ignore();
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(RawError::Redis)?;
            }
            *provider
                .inner
                .client
                .write()
                .unwrap_or_else(|e| e.into_inner()) = client.clone();
            if let (Some(waiting), Some(_)) = (&provider.inner.waiting, client) {
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let weak = Arc::downgrade(&provider.inner);
                let current = Arc::downgrade(&provider.inner);
                tokio::spawn(waiting::subscribe(
                    move || {
                        let inner = current.upgrade()?;

                        inner
                            .client
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone()
                    },
                    Arc::clone(&provider.inner.moved),
                    Arc::clone(waiting),
                    config.connect_timeout,
                    ready_tx,
                    move |key| {
                        // A reservation nobody here wants any more: pass it on.
                        if let Some(inner) = weak.upgrade() {
                            let provider = RedisProvider { inner };
                            tokio::spawn(async move { provider.withdraw(&key, false).await });
                        }
                    },
                ));
                match ready_rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(RawError::Redis(e)),
                    Err(_) => {
                        return Err(RawError::Connect(
                            "the subscription task ended".into(),
                            None,
                        ));
                    }
                }
            }
            Ok(())
        };
        match tokio::time::timeout(config.connect_timeout, startup).await {
            Ok(Ok(())) => Ok(provider),
            Ok(Err(RawError::Redis(e))) if is_auth_error(&e) => Err(ConfigError::AuthFailed {
                url: provider.inner.url.clone(),
                reason: e.to_string(),
            }),
            Ok(Err(RawError::Redis(e))) => Err(unreachable(e.to_string(), Some(e))),
            Ok(Err(RawError::Connect(reason, source))) => Err(unreachable(reason, source)),
            Ok(Err(RawError::Closed)) => Err(unreachable("the pool is closed".into(), None)),
            Err(_) => Err(unreachable(
                format!("no answer within {:?}", config.connect_timeout),
                None,
            )),
        }
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        self.inner.layout.namespace()
    }

    /// The pool connections come from (a handle: pools are cheap to clone);
    /// `None` on a Redis Cluster.
    pub fn pool(&self) -> Option<Pool> {
        self.inner.conns.pool()
    }

    /// The Redis key that holds the lock `key` (for inspection and tests).
    pub fn lock_key(&self, key: &str) -> String {
        self.inner.layout.lock_key(key)
    }

    /// How many requests (round trips) this provider has sent to Redis on
    /// its shared connection: one per script call, retries included. The
    /// subscription's own traffic is not counted.
    pub fn round_trips(&self) -> u64 {
        self.inner.conns.sent()
    }

    /// Whether release notifications are currently being received.
    pub fn is_notified(&self) -> bool {
        self.inner
            .waiting
            .as_ref()
            .is_some_and(|w| w.is_subscribed())
    }

    async fn eval(
        &self,
        operation: &'static str,
        script: &'static redis::Script,
        keys: &[String],
        args: &[&str],
    ) -> Result<Value, LockError> {
        // Boxed: redis-rs's invocation future is several kilobytes, and
        // inline it would make every waiting acquisition that large too.
        Box::pin(self.inner.conns.run(operation, |mut conn| async move {
            let mut invocation = script.prepare_invoke();
            for k in keys {
                invocation.key(k);
            }
            for a in args {
                invocation.arg(*a);
            }
            invocation.invoke_async::<Value>(&mut conn).await
        }))
        .await
    }

    fn check_open(&self) -> Result<(), LockError> {
        if self.inner.conns.is_closed() {
            return Err(LockError::Shutdown {
                provider: "locking-redis".into(),
            });
        }
        Ok(())
    }

    fn channel_prefix(&self) -> &str {
        self.inner
            .waiting
            .as_ref()
            .map_or("", |w| w.channel_prefix.as_str())
    }

    /// The channel prefix for scripts touching `lock_key`: per slot on a
    /// cluster (see shards.rs), the process's otherwise.
    fn channel_prefix_for(&self, lock_key: &str) -> std::borrow::Cow<'_, str> {
        #[cfg(feature = "cluster")]
        if let Some(shards) = self.inner.shards.get() {
            return shards.prefix(self.inner.layout.slot_of(lock_key)).into();
        }
        let _ = lock_key;
        self.channel_prefix().into()
    }

    /// A PING, for a Redlock set's startup.
    #[cfg(feature = "redlock")]
    pub(crate) async fn ping(&self) -> Result<(), LockError> {
        self.inner
            .conns
            .run("ping", |mut conn| async move {
                redis::cmd("PING").query_async::<()>(&mut conn).await
            })
            .await
    }
}

impl RedisProvider {}

fn unexpected(operation: &'static str, e: impl std::fmt::Display) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::Server,
        operation,
        format!("unexpected reply: {e}"),
        None,
    ))
}

/// An acquisition that too few replicas acknowledged (and that was, or is
/// being, released).
fn not_replicated(acked: i64, required: usize, wait: Duration) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::NotReplicated,
        "acquire",
        format!(
            "{acked} of {required} replicas acknowledged within {wait:?}; the locks were released"
        ),
        None,
    ))
}

/// How often the cluster connection retries a request by itself.
#[cfg(feature = "cluster")]
const CLUSTER_RETRIES: u32 = 6;

/// A redis-rs cluster client builder for the seed nodes of `config`.
#[cfg(feature = "cluster")]
fn cluster_client(
    config: &RedisConfig,
) -> Result<redis::cluster::ClusterClientBuilder, ConfigError> {
    let mut nodes = Vec::with_capacity(config.cluster_nodes.len());
    for url in &config.cluster_nodes {
        nodes.push(parse_url(url)?);
    }
    // A `WAIT` for replicas takes up to its own timeout on top: lockstep
    // bounds each call itself (Connections::run_within).
    let mut response_timeout = config.response_timeout;
    if config.replicas > 0 {
        response_timeout += config.replica_timeout;
    }
    #[allow(unused_mut)] // without the `tls` feature
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(response_timeout)
        // redis-rs retries redirections, TRYAGAIN and lost connections
        // itself; by default up to 16 times, sleeping at least 1.28 s
        // between tries, which would hide a resharding or failover behind
        // "timed out". A few short tries here; waiting calls retry on
        // their own until their deadline (a passing error).
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(5)
        .max_retry_wait(100);
    #[cfg(feature = "tls")]
    if let Some(pem) = tls_setup(&config.cluster_nodes[0], config)? {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
    }
    #[cfg(not(feature = "tls"))]
    tls_setup(&config.cluster_nodes[0], config)?;
    Ok(builder)
}

#[cfg(feature = "cluster")]
fn cluster_error(e: redis::RedisError) -> ConfigError {
    ConfigError::InvalidSetting {
        name: "cluster_nodes",
        reason: e.to_string(),
    }
}

/// A redis-rs client for `url`: its connection info (with TLS settings)
/// feeds the pool, and it opens the subscription.
fn client_for(url: &str, config: &RedisConfig) -> Result<redis::Client, ConfigError> {
    let info = parse_url(url)?;
    let invalid = |reason: String| ConfigError::InvalidUrl {
        url: redact_url(url),
        reason,
    };
    #[cfg(feature = "tls")]
    if let Some(pem) = tls_setup(url, config)? {
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        return redis::Client::build_with_tls(info, certificates)
            .map_err(|e| invalid(e.to_string()));
    }
    #[cfg(not(feature = "tls"))]
    tls_setup(url, config)?;
    redis::Client::open(info).map_err(|e| invalid(e.to_string()))
}

/// Checks `config.tls_root_cert` against `url` (it needs `rediss://`), gets
/// rustls ready for a `rediss://` URL, and returns the private CA, read.
fn tls_setup(url: &str, config: &RedisConfig) -> Result<Option<Vec<u8>>, ConfigError> {
    let tls = url.starts_with("rediss://");
    if !tls {
        return match config.tls_root_cert {
            Some(_) => Err(ConfigError::InvalidSetting {
                name: "tls_root_cert",
                reason: "is only used with rediss:// URLs".into(),
            }),
            None => Ok(None),
        };
    }
    // redis-rs's rustls comes without a crypto provider: install ring's
    // (a no-op if the application installed one first).
    #[cfg(feature = "tls")]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(path) = &config.tls_root_cert else {
        return Ok(None);
    };
    std::fs::read(path)
        .map(Some)
        .map_err(|e| ConfigError::InvalidSetting {
            name: "tls_root_cert",
            reason: format!("cannot read {}: {e}", path.display()),
        })
}

/// Checks a URL's scheme and syntax, with errors that never show the password.
fn parse_url(url: &str) -> Result<redis::ConnectionInfo, ConfigError> {
    use redis::IntoConnectionInfo;
    let invalid = |reason: String| ConfigError::InvalidUrl {
        url: redact_url(url),
        reason,
    };
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "redis+unix" | "unix" => {}
        "rediss" if cfg!(feature = "tls") => {}
        "rediss" => {
            return Err(invalid(
                "rediss:// (TLS) needs lockstep's `tls` cargo feature".into(),
            ));
        }
        _ if !url.contains("://") => {
            return Err(invalid("expected redis://host[:port][/db]".into()));
        }
        other => {
            return Err(invalid(format!(
                "unsupported scheme {other:?}; use redis://, rediss:// or redis+unix://"
            )));
        }
    }
    url.into_connection_info().map_err(|e| {
        // redis-rs messages describe the problem, not the URL; drop any
        // detail that might echo it anyway.
        let reason = e.to_string();
        if reason.contains(url) {
            invalid("the URL does not parse".into())
        } else {
            invalid(reason)
        }
    })
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
        Box::pin(async move {
            self.check_open()?;
            let layout = &self.inner.layout;
            let mut lock_keys: Vec<String> = keys.iter().map(|k| layout.lock_key(k)).collect();
            #[cfg(feature = "cluster")]
            if self.is_cluster() {
                let ttl = millis_ceil(lease).to_string();
                return match self.extend_grouped(&lock_keys, owner, &ttl).await? {
                    None => Ok(()),
                    Some(i) => Err(LockError::NotOwner {
                        key: keys[i].clone(),
                    }),
                };
            }
            if let Some(o) = owner {
                lock_keys.push(layout.owner_index(o));
            }
            let count = keys.len().to_string();
            let ttl = millis_ceil(lease).to_string();
            let reply = self
                .eval(
                    "extend",
                    &scripts::EXTEND,
                    &lock_keys,
                    &[&count, owner.unwrap_or(""), &ttl],
                )
                .await?;
            match redis::from_redis_value::<i64>(reply).map_err(|e| unexpected("extend", e))? {
                0 => Ok(()),
                i if i >= 1 && (i as usize) <= keys.len() => Err(LockError::NotOwner {
                    key: keys[i as usize - 1].clone(),
                }),
                other => Err(unexpected("extend", format!("index {other}"))),
            }
        })
    }

    fn release_all<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, LockError>> {
        Box::pin(async move {
            self.check_open()?;
            #[cfg(feature = "cluster")]
            if self.is_cluster() {
                return self.release_all_cluster(owner).await;
            }
            let layout = &self.inner.layout;
            let reply = match owner {
                Some(o) => {
                    let keys = [layout.owner_index(o)];
                    let claim = self.inner.claim_ms.to_string();
                    self.eval(
                        "release_all",
                        &scripts::RELEASE_ALL,
                        &keys,
                        &["owner", o, &claim, self.channel_prefix()],
                    )
                    .await?
                }
                None => {
                    let pattern = layout.scan_pattern();
                    self.eval(
                        "release_all",
                        &scripts::RELEASE_ALL,
                        &[],
                        &[
                            "namespace",
                            layout.namespace(),
                            &pattern,
                            self.channel_prefix(),
                        ],
                    )
                    .await?
                }
            };
            redis::from_redis_value::<u64>(reply).map_err(|e| unexpected("release_all", e))
        })
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
