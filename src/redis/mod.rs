//! The Redis provider: locks shared by every process that uses one Redis.

mod config;
mod connection;
mod layout;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, Value};
use tokio::time::{Instant, sleep};
use tracing::Instrument;

pub use config::{DEFAULT_NAMESPACE, ENV_URL, RedisConfig};

use crate::error::{BackendError, BackendErrorKind, ConfigError, LockError};
use crate::options::millis_ceil;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider};
use crate::token::{nonce, unit_random};
use config::redact_url;
use connection::{Connections, RawError, is_auth_error};
use layout::Layout;

/// The first pause before retrying a contended lock.
const RETRY_MIN: Duration = Duration::from_millis(5);
/// The longest pause between retries of a contended lock.
const RETRY_MAX: Duration = Duration::from_millis(100);
/// The longest pause between attempts to undo an acquisition whose reply
/// was lost.
const UNDO_RETRY_MAX: Duration = Duration::from_secs(5);

/// Locks in Redis, shared by every process that uses the same server and
/// namespace.
///
/// - **Atomic.** Each operation is one Lua script (`lua/` in the
///   repository), so a multi-key acquisition takes all keys or none, and
///   ownership checks cannot race with expiry.
/// - **Connections.** All operations share one multiplexed connection,
///   supplied by a deadpool pool and replaced after a failure; nothing holds
///   a pooled connection while waiting. [`shutdown`](LockingProvider::shutdown)
///   closes them.
/// - **Failures.** Every call is bounded by the response timeout. A call
///   whose reply did not arrive has an *unknown outcome*; an acquisition in
///   that state is undone (its keys released by this attempt's nonce, so
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
}

/// A decoded reply of `acquire.lua`.
enum AcquireReply {
    Acquired {
        tokens: Vec<u64>,
        reentered: Vec<bool>,
    },
    Held {
        index: usize,
        pttl: i64,
    },
    Foreign {
        index: usize,
    },
}

impl RedisProvider {
    /// Connects to Redis as configured: checks the settings, opens the
    /// first connection (with AUTH when the URL has credentials), pings
    /// and loads the scripts, all within the connect timeout.
    ///
    /// # Errors
    ///
    /// [`ConfigError::MissingUrl`], [`ConfigError::InvalidUrl`],
    /// [`ConfigError::InvalidSetting`], [`ConfigError::Unreachable`] (no
    /// answer within the connect timeout), [`ConfigError::AuthFailed`].
    pub async fn connect(config: RedisConfig) -> Result<Self, ConfigError> {
        config.check()?;
        let url = config
            .url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingUrl { env: ENV_URL })?;
        let info = parse_url(url)?;
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
        Self::start(pool, &config, redact_url(url)).await
    }

    /// Connects using the environment (see [`RedisConfig::from_env`]).
    ///
    /// # Errors
    ///
    /// As [`RedisConfig::from_env`] and [`RedisProvider::connect`].
    pub async fn from_env() -> Result<Self, ConfigError> {
        Self::connect(RedisConfig::from_env()?).await
    }

    /// Uses an existing deadpool pool; `config.url` and `config.pool_size`
    /// are not used. The pool's own connection settings apply (redis-rs
    /// defaults to a 500 ms response timeout); lockstep's response timeout
    /// bounds every call as well.
    ///
    /// # Errors
    ///
    /// As [`RedisProvider::connect`], except for URL errors.
    pub async fn from_pool(pool: Pool, config: &RedisConfig) -> Result<Self, ConfigError> {
        config.check()?;
        Self::start(pool, config, "the given pool".to_owned()).await
    }

    async fn start(pool: Pool, config: &RedisConfig, url: String) -> Result<Self, ConfigError> {
        let provider = RedisProvider {
            inner: Arc::new(Inner {
                conns: Connections::new(pool, config.connect_timeout, config.response_timeout),
                layout: Layout::new(&config.namespace),
                wait_timeout: config.wait_timeout,
                url,
            }),
        };
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
            let mut pipe = redis::pipe();
            for script in scripts::all() {
                pipe.load_script(script).ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(RawError::Redis)
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

    /// The pool connections come from.
    pub fn pool(&self) -> &Pool {
        self.inner.conns.pool()
    }

    /// The Redis key that holds the lock `key` (for inspection and tests).
    pub fn lock_key(&self, key: &str) -> String {
        self.inner.layout.lock_key(key)
    }

    async fn eval(
        &self,
        operation: &'static str,
        script: &'static redis::Script,
        keys: &[String],
        args: &[&str],
    ) -> Result<Value, LockError> {
        self.inner
            .conns
            .run(operation, |mut conn| async move {
                let mut invocation = script.prepare_invoke();
                for k in keys {
                    invocation.key(k);
                }
                for a in args {
                    invocation.arg(*a);
                }
                invocation.invoke_async::<Value>(&mut conn).await
            })
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

    async fn acquire_inner(&self, request: &AcquireRequest) -> Result<Acquired, LockError> {
        self.check_open()?;
        let layout = &self.inner.layout;
        let n = request.keys.len();
        let mut keys: Vec<String> = request.keys.iter().map(|k| layout.lock_key(k)).collect();
        keys.extend(request.keys.iter().map(|k| layout.fence_key(k)));
        if let Some(owner) = &request.owner {
            keys.push(layout.owner_index(owner));
        }
        let owner = request.owner.as_deref().unwrap_or("");
        let ttl = request.expire.map_or(0, millis_ceil).to_string();
        let count = n.to_string();
        let mut pause = RETRY_MIN;
        let mut waited = None::<tracing::Span>;
        loop {
            let nonce = nonce();
            let sent_at = Instant::now();
            let undo = UndoGuard {
                provider: self,
                keys: &keys[..n],
                owner,
                nonce: &nonce,
                expire: request.expire,
                armed: true,
            };
            let reply = self
                .eval(
                    "acquire",
                    &scripts::ACQUIRE,
                    &keys,
                    &[&count, owner, &nonce, &ttl],
                )
                .await;
            let reply = match reply {
                Err(e) if e.is_outcome_unknown() => return Err(e), // `undo` fires on drop
                other => {
                    undo.disarm();
                    decode_acquire(other?, n)?
                }
            };
            match reply {
                AcquireReply::Acquired { tokens, reentered } => {
                    return Ok(Acquired::new(tokens, reentered, sent_at));
                }
                AcquireReply::Foreign { index } => {
                    let key = request.keys.get(index).unwrap_or(&request.keys[0]);
                    return Err(LockError::ForeignValue { key: key.clone() });
                }
                AcquireReply::Held { index, pttl } => {
                    let key = &request.keys[index];
                    let remaining = request.wait.remaining();
                    if remaining == Some(Duration::ZERO) {
                        return Err(request.wait.give_up(key));
                    }
                    // Jittered exponential backoff, never past the holder's
                    // lease (the lock is free then) nor past the deadline.
                    let mut nap = pause.mul_f64(0.5 + 0.5 * unit_random());
                    if pttl > 0 {
                        nap = nap.min(Duration::from_millis(pttl as u64 + 1));
                    }
                    if let Some(r) = remaining {
                        nap = nap.min(r);
                    }
                    pause = (pause * 2).min(RETRY_MAX);
                    let span = waited.get_or_insert_with(|| {
                        tracing::trace_span!("lockstep.wait", provider = "locking-redis", key = %key)
                    });
                    sleep(nap).instrument(span.clone()).await;
                    self.check_open()?;
                }
            }
        }
    }
}

/// Undoes an acquisition attempt whose reply never arrived, when dropped
/// armed: on an "outcome unknown" error, and when the caller's future is
/// dropped mid-call. Releases only what this attempt took (matched by its
/// nonce), in a background task that retries until it succeeds, the lease
/// would have ended anyway, or the provider shuts down.
struct UndoGuard<'a> {
    provider: &'a RedisProvider,
    keys: &'a [String],
    owner: &'a str,
    nonce: &'a str,
    expire: Option<Duration>,
    armed: bool,
}

impl UndoGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for UndoGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "acquisition abandoned outside a Tokio runtime; its locks expire with their lease"
            );
            return;
        };
        let provider = self.provider.clone();
        let keys = self.keys.to_vec();
        let owner = self.owner.to_owned();
        let nonce = self.nonce.to_owned();
        let give_up_at = self.expire.map(|e| Instant::now() + e);
        runtime.spawn(async move {
            let mut pause = RETRY_MIN;
            loop {
                match provider.release_keys(&keys, &owner, &nonce).await {
                    Ok(_) => return,
                    Err(LockError::Shutdown { .. }) => return,
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
}

impl RedisProvider {
    /// Runs `release.lua` on already-mapped lock keys.
    async fn release_keys(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
    ) -> Result<Vec<bool>, LockError> {
        let mut keys = lock_keys.to_vec();
        if !owner.is_empty() {
            keys.push(self.inner.layout.owner_index(owner));
        }
        let count = lock_keys.len().to_string();
        let reply = self
            .eval("release", &scripts::RELEASE, &keys, &[&count, owner, nonce])
            .await?;
        let flags: Vec<i64> =
            redis::from_redis_value(reply).map_err(|e| unexpected("release", e))?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }
}

fn unexpected(operation: &'static str, e: impl std::fmt::Display) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::Server,
        operation,
        format!("unexpected reply: {e}"),
        None,
    ))
}

fn decode_acquire(reply: Value, n: usize) -> Result<AcquireReply, LockError> {
    let bad = |what: &str| unexpected("acquire", what);
    let Value::Array(items) = reply else {
        return Err(bad("not an array"));
    };
    let int = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        _ => None,
    };
    let ints = |v: &Value| match v {
        Value::Array(a) => a.iter().map(int).collect::<Option<Vec<i64>>>(),
        _ => None,
    };
    match items.first().and_then(int) {
        Some(1) => {
            let tokens = items
                .get(1)
                .and_then(ints)
                .ok_or_else(|| bad("no tokens"))?;
            let reentered = items
                .get(2)
                .and_then(ints)
                .ok_or_else(|| bad("no re-entry flags"))?;
            if tokens.len() != n || reentered.len() != n || tokens.iter().any(|t| *t <= 0) {
                return Err(bad("tokens do not match the keys"));
            }
            Ok(AcquireReply::Acquired {
                tokens: tokens.into_iter().map(|t| t as u64).collect(),
                reentered: reentered.into_iter().map(|r| r == 1).collect(),
            })
        }
        Some(0) => {
            let index = items.get(1).and_then(int).ok_or_else(|| bad("no index"))?;
            let pttl = items.get(2).and_then(int).unwrap_or(-1);
            if index < 1 || index as usize > n {
                return Err(bad("index out of range"));
            }
            Ok(AcquireReply::Held {
                index: index as usize - 1,
                pttl,
            })
        }
        Some(2) => {
            let index = items.get(1).and_then(int).ok_or_else(|| bad("no index"))?;
            // Indices past the lock keys name internal keys; report the first
            // lock key then, the one the caller can act on.
            Ok(AcquireReply::Foreign {
                index: (index.max(1) as usize - 1).min(n),
            })
        }
        _ => Err(bad("unknown status")),
    }
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
        Box::pin(async move {
            self.check_open()?;
            let lock_keys: Vec<String> =
                keys.iter().map(|k| self.inner.layout.lock_key(k)).collect();
            self.release_keys(&lock_keys, owner.unwrap_or(""), "").await
        })
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
            let layout = &self.inner.layout;
            let reply = match owner {
                Some(o) => {
                    let keys = [layout.owner_index(o)];
                    self.eval("release_all", &scripts::RELEASE_ALL, &keys, &["owner", o])
                        .await?
                }
                None => {
                    let pattern = layout.scan_pattern();
                    self.eval(
                        "release_all",
                        &scripts::RELEASE_ALL,
                        &[],
                        &["namespace", layout.namespace(), &pattern],
                    )
                    .await?
                }
            };
            redis::from_redis_value::<u64>(reply).map_err(|e| unexpected("release_all", e))
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.inner.conns.close() })
    }
}
