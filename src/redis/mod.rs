//! The Redis provider: locks shared by every process that uses one Redis.

mod config;
mod connection;
mod layout;
mod scripts;
mod waiting;

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, Value};
use tokio::time::{Instant, sleep};
use tracing::Instrument;

pub use config::{DEFAULT_NAMESPACE, ENV_URL, RedisConfig};

use crate::error::{BackendError, BackendErrorKind, ConfigError, LockError};
use crate::options::millis_ceil;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider, Wait};
use crate::token::{nonce, unit_random};
use config::redact_url;
use connection::{Connections, RawError, is_auth_error};
use layout::Layout;
use waiting::{Left, Waiter, Waiting};

/// The first pause before retrying a contended lock, when polling.
const RETRY_MIN: Duration = Duration::from_millis(5);
/// The longest pause between retries of a contended lock, when polling.
const RETRY_MAX: Duration = Duration::from_millis(100);
/// The longest pause between attempts to undo an acquisition whose reply
/// was lost.
const UNDO_RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest a wait queue is kept alive by one waiter without news.
const QUEUE_TTL_MAX: Duration = Duration::from_secs(3600);

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
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(w) = &self.waiting {
            w.stop.cancel();
        }
    }
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

/// The Redis keys of one request: the lock keys, then their fencing
/// counters and wait queues, then the owner's index if it has one.
struct Keyset {
    n: usize,
    all: Vec<String>,
    index: Option<String>,
    /// Set when an attempt got no reply: it may have taken the locks.
    uncertain: std::sync::atomic::AtomicBool,
}

impl Keyset {
    fn locks(&self) -> &[String] {
        &self.all[..self.n]
    }
}

/// How an attempt asks to be queued if it finds a lock held.
struct Queueing<'a> {
    pid: &'a str,
    entry: &'a str,
    more: bool,
    queue_ttl_ms: u64,
}

const NO_QUEUE: Queueing<'static> = Queueing {
    pid: "",
    entry: "",
    more: false,
    queue_ttl_ms: 0,
};

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
        let (pool, client, url) = Self::pool_for(&config)?;
        Self::start(pool, Some(client), &config, url).await
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
        let info = client.get_connection_info().clone();
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
        Ok((pool, client, redact_url(url)))
    }

    /// A provider for `config.url` that connects on first use, without
    /// notifications (waiters poll): one master of a Redlock set, which must
    /// be usable while some of its masters are down.
    #[cfg(feature = "redlock")]
    pub(crate) fn connect_lazily(config: &RedisConfig) -> Result<Self, ConfigError> {
        let (pool, _client, url) = Self::pool_for(config)?;
        Ok(Self::build(pool, config, url, None))
    }

    fn build(pool: Pool, config: &RedisConfig, url: String, waiting: Option<Arc<Waiting>>) -> Self {
        RedisProvider {
            inner: Arc::new(Inner {
                conns: Connections::new(pool, config.connect_timeout, config.response_timeout),
                layout: Layout::new(&config.namespace),
                wait_timeout: config.wait_timeout,
                url,
                waiting,
                fair: config.fair,
                claim_ms: (2 * config.response_timeout.as_millis() as u64).max(200),
                response_timeout: config.response_timeout,
                fallback: config.wait_fallback,
                replicas: (config.replicas, config.replica_timeout),
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
        Self::start(pool, client, config, "the given pool".to_owned()).await
    }

    async fn start(
        pool: Pool,
        client: Option<redis::Client>,
        config: &RedisConfig,
        url: String,
    ) -> Result<Self, ConfigError> {
        let waiting =
            (config.notifications && client.is_some()).then(|| Waiting::new(&config.namespace));
        let provider = Self::build(pool, config, url, waiting);
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
                .map_err(RawError::Redis)?;
            if let (Some(waiting), Some(client)) = (&provider.inner.waiting, client) {
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let weak = Arc::downgrade(&provider.inner);
                tokio::spawn(waiting::subscribe(
                    client,
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

    /// The pool connections come from.
    pub fn pool(&self) -> &Pool {
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

    fn keyset(&self, request: &AcquireRequest) -> Keyset {
        let layout = &self.inner.layout;
        let n = request.keys.len();
        let mut all: Vec<String> = request.keys.iter().map(|k| layout.lock_key(k)).collect();
        all.extend(request.keys.iter().map(|k| layout.fence_key(k)));
        for i in 0..n {
            let queue = layout.queue_key(&all[i]);
            all.push(queue);
        }
        let index = request
            .owner
            .as_deref()
            .filter(|_| request.indexed)
            .map(|o| layout.owner_index(o));
        if let Some(index) = &index {
            all.push(index.clone());
        }
        Keyset {
            n,
            all,
            index,
            uncertain: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// One run of `acquire.lua`.
    async fn attempt(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
        queueing: &Queueing<'_>,
    ) -> Result<AcquireReply, LockError> {
        let owner = request.owner.as_deref().unwrap_or("");
        let ttl = request.expire.map_or(0, millis_ceil).to_string();
        let args = [
            keys.n.to_string(),
            owner.to_owned(),
            nonce.to_owned(),
            ttl,
            queueing.pid.to_owned(),
            queueing.entry.to_owned(),
            if self.inner.fair { "1" } else { "0" }.to_owned(),
            queueing.queue_ttl_ms.to_string(),
            self.inner.claim_ms.to_string(),
            self.channel_prefix().to_owned(),
            if queueing.more { "1" } else { "0" }.to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = if self.inner.replicas.0 > 0 {
            self.acquire_replicated(keys, &args, owner, nonce, request.expire)
                .await
        } else {
            self.eval("acquire", &scripts::ACQUIRE, &keys.all, &args)
                .await
        };
        if reply.as_ref().is_err_and(LockError::is_outcome_unknown) {
            keys.uncertain
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        decode_acquire(reply?, keys.n)
    }

    /// `acquire.lua`, then `WAIT` for the replicas on the same connection;
    /// an acquisition they did not all acknowledge is released again.
    async fn acquire_replicated(
        &self,
        keys: &Keyset,
        args: &[&str],
        owner: &str,
        nonce: &str,
        expire: Option<Duration>,
    ) -> Result<Value, LockError> {
        let (required, wait) = self.inner.replicas;
        let limit = self.inner.response_timeout + wait;
        let (reply, acked) = self
            .inner
            .conns
            .run_exclusive("acquire", limit, |mut conn| async move {
                let mut invocation = scripts::ACQUIRE.prepare_invoke();
                for k in &keys.all {
                    invocation.key(k);
                }
                for a in args {
                    invocation.arg(*a);
                }
                let reply = invocation.invoke_async::<Value>(&mut conn).await?;
                let granted =
                    matches!(&reply, Value::Array(items) if items.first() == Some(&Value::Int(1)));
                if !granted {
                    return Ok((reply, None));
                }
                let acked: i64 = redis::cmd("WAIT")
                    .arg(required)
                    .arg(wait.as_millis() as u64)
                    .query_async(&mut conn)
                    .await?;
                Ok((reply, Some(acked)))
            })
            .await?;
        match acked {
            Some(acked) if (acked as usize) < required => {
                // Not durable enough: give back what this acquisition took.
                if let Err(e) = self.release_keys(keys.locks(), owner, nonce, None).await {
                    self.undo_later(
                        keys.locks().to_vec(),
                        owner.to_owned(),
                        nonce.to_owned(),
                        expire,
                    );
                    tracing::debug!(
                        "releasing an unreplicated acquisition failed, retrying in the background: {e}"
                    );
                }
                Err(LockError::Backend(BackendError::new(
                    BackendErrorKind::NotReplicated,
                    "acquire",
                    format!(
                        "{acked} of {required} replicas acknowledged within {wait:?}; the locks were released"
                    ),
                    None,
                )))
            }
            _ => Ok(reply),
        }
    }

    fn channel_prefix(&self) -> &str {
        self.inner
            .waiting
            .as_ref()
            .map_or("", |w| w.channel_prefix.as_str())
    }

    async fn acquire_inner(&self, request: &AcquireRequest) -> Result<Acquired, LockError> {
        self.check_open()?;
        let keys = self.keyset(request);
        let nonce = nonce();
        // Any attempt may have taken the locks without our hearing of it
        // (a lost reply, a dropped future): undo by this call's nonce
        // unless the call ends with an answer.
        let undo = UndoGuard {
            provider: self,
            keys: keys.locks(),
            owner: request.owner.as_deref().unwrap_or(""),
            nonce: &nonce,
            expire: request.expire,
            armed: true,
        };
        let result = match (&self.inner.waiting, request.wait) {
            (_, Wait::Once) => self.acquire_once(request, &keys, &nonce).await,
            (Some(w), _) if keys.n == 1 && self.inner.fair => {
                self.acquire_queued(w, request, &keys, &nonce).await
            }
            (Some(w), _) => self.acquire_woken(w, request, &keys, &nonce).await,
            (None, _) => self.acquire_polling(request, &keys, &nonce).await,
        };
        // An attempt without a reply may have taken the locks: unless this
        // call ends holding them, `undo` releases them (by nonce) on drop.
        if result.is_ok() || !keys.uncertain.load(std::sync::atomic::Ordering::Relaxed) {
            undo.disarm();
        }
        result
    }

    /// One attempt with the caller's nonce, on one master of a Redlock set:
    /// `Err(index)` of a key found held. No undo: the set releases by this nonce on
    /// every master when the quorum is not reached.
    #[cfg(feature = "redlock")]
    pub(crate) async fn try_with_nonce(
        &self,
        request: &AcquireRequest,
        nonce: &str,
    ) -> Result<Result<Acquired, usize>, LockError> {
        self.check_open()?;
        let keys = self.keyset(request);
        let sent_at = Instant::now();
        match self.attempt(request, &keys, nonce, &NO_QUEUE).await? {
            AcquireReply::Acquired { tokens, reentered } => {
                Ok(Ok(Acquired::new(tokens, reentered, sent_at)))
            }
            AcquireReply::Held { index, .. } => Ok(Err(index)),
            AcquireReply::Foreign { index } => Err(foreign(request, index)),
        }
    }

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

    /// A single attempt; never queues (and, when fair, never takes a lock
    /// another process is queued for).
    async fn acquire_once(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let sent_at = Instant::now();
        match self.attempt(request, keys, nonce, &NO_QUEUE).await? {
            AcquireReply::Acquired { tokens, reentered } => {
                Ok(Acquired::new(tokens, reentered, sent_at))
            }
            AcquireReply::Held { index, .. } => Err(request.wait.give_up(&request.keys[index])),
            AcquireReply::Foreign { index } => Err(foreign(request, index)),
        }
    }

    /// Waiting without notifications: jittered exponential backoff, never
    /// past the holder's lease nor past the deadline.
    async fn acquire_polling(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let mut pause = RETRY_MIN;
        let mut span = None::<tracing::Span>;
        loop {
            let sent_at = Instant::now();
            let (index, pttl) = match self.attempt(request, keys, nonce, &NO_QUEUE).await {
                Ok(AcquireReply::Acquired { tokens, reentered }) => {
                    return Ok(Acquired::new(tokens, reentered, sent_at));
                }
                Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                Ok(AcquireReply::Held { index, pttl }) => (index, pttl),
                Err(e) if keep_trying(request, &e) => (0, RETRY_MAX.as_millis() as i64),
                Err(e) => return Err(e),
            };
            let key = &request.keys[index];
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(request.wait.give_up(key));
            }
            let mut nap = pause.mul_f64(0.5 + 0.5 * unit_random());
            if pttl > 0 {
                nap = nap.min(Duration::from_millis(pttl as u64 + 1));
            }
            if let Some(r) = remaining {
                nap = nap.min(r);
            }
            pause = (pause * 2).min(RETRY_MAX);
            let span = span.get_or_insert_with(|| wait_span(key));
            sleep(nap).instrument(span.clone()).await;
            self.check_open()?;
        }
    }

    /// A single-key, fair wait: this process queues once in Redis; local
    /// waiters queue behind each other and are handed the lock in order.
    async fn acquire_queued(
        &self,
        waiting: &Arc<Waiting>,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let key = &keys.locks()[0];
        let owner = request.owner.as_deref().unwrap_or("");
        let ttl_ms = request.expire.map_or(0, millis_ceil);
        let waiter = Waiter::new(owner, nonce, ttl_ms, keys.index.clone());
        let mut guard = LocalGuard {
            provider: self,
            waiting,
            waiter: &waiter,
            key: Some(key.clone()),
        };
        let span = wait_span(&request.keys[0]);
        let mut attempt_now = waiting.join_single(key, &waiter);
        let mut holder_expiry = None::<Instant>;
        let mut pause = RETRY_MIN;
        let mut last_error = None::<LockError>;
        loop {
            if let Some((token, sent_at)) = waiter.granted() {
                guard.finish(waiting.mark_gone(&waiter).is_some());
                return Ok(Acquired::new(vec![token], vec![false], sent_at));
            }
            if attempt_now && waiter.begin_attempt() {
                let queueing = Queueing {
                    pid: &waiting.pid,
                    entry: &waiting.pid,
                    more: waiting.others_waiting(key, &waiter),
                    queue_ttl_ms: self.queue_ttl_ms(request),
                };
                let sent_at = Instant::now();
                let reply = self.attempt(request, keys, nonce, &queueing).await;
                waiter.end_attempt();
                match reply {
                    Ok(AcquireReply::Acquired { tokens, reentered }) => {
                        waiting.mark_gone(&waiter);
                        guard.finish(true);
                        return Ok(Acquired::new(tokens, reentered, sent_at));
                    }
                    Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                    Ok(AcquireReply::Held { pttl, .. }) => {
                        holder_expiry = (pttl > 0)
                            .then(|| Instant::now() + Duration::from_millis(pttl as u64 + 1));
                    }
                    Err(e) if keep_trying(request, &e) => {
                        // Redis is away: try again soon, as the first waiter.
                        last_error = Some(e);
                        holder_expiry = Some(Instant::now() + self.retry_pause(&mut pause));
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if let Wait::Until(deadline) = request.wait
                && now >= deadline
            {
                if waiter.is_being_handed() {
                    // A release is handing us the lock: take its answer.
                    waiter
                        .sleep_until(now + 2 * self.inner.response_timeout)
                        .await;
                    attempt_now = false;
                    continue;
                }
                if waiter.granted().is_some() {
                    continue;
                }
                // Out of time while Redis was away: say so.
                return Err(last_error
                    .take()
                    .unwrap_or_else(|| request.wait.give_up(&request.keys[0])));
            }
            let fallback = self.quiet_period(waiting, &mut pause);
            let mut until = now + fallback;
            if let Some(at) = holder_expiry.filter(|_| waiting.is_first(key, &waiter)) {
                until = until.min(at);
            }
            if let Wait::Until(deadline) = request.wait {
                until = until.min(deadline);
            }
            waiter.sleep_until(until).instrument(span.clone()).await;
            waiter.take_woken();
            self.check_open()?;
            // Only the first local waiter speaks for the process; the
            // others wait for their turn or for a release to hand them
            // the lock.
            attempt_now = waiting.is_first(key, &waiter);
        }
    }

    /// Waiting to be woken: multi-key requests, and every request when
    /// barging. Each wake-up is a new attempt.
    async fn acquire_woken(
        &self,
        waiting: &Arc<Waiting>,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let owner = request.owner.as_deref().unwrap_or("");
        let waiter = Waiter::new(owner, nonce, 0, None);
        // Registered for every key before the first attempt: a release can
        // be published before the reply that says which key was held
        // reaches us, and must not find nobody to wake.
        for key in keys.locks() {
            waiting.join_other(key, &waiter);
        }
        let mut guard = WokenGuard {
            provider: self,
            waiting,
            waiter: &waiter,
            keys: keys.locks(),
            enqueued: Vec::new(),
        };
        let entry = format!("~{}", waiting.pid);
        let mut span = None::<tracing::Span>;
        let mut pause = RETRY_MIN;
        loop {
            let queueing = Queueing {
                pid: &waiting.pid,
                entry: &entry,
                more: false,
                queue_ttl_ms: self.queue_ttl_ms(request),
            };
            let sent_at = Instant::now();
            let (index, pttl) = match self.attempt(request, keys, nonce, &queueing).await {
                Ok(AcquireReply::Acquired { tokens, reentered }) => {
                    // Wake entries left in queues cost one stray message at
                    // the next release: cheaper than a call to remove them
                    // (and other local waiters may still need them).
                    guard.enqueued.clear();
                    return Ok(Acquired::new(tokens, reentered, sent_at));
                }
                Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                Ok(AcquireReply::Held { index, pttl }) => {
                    if !guard.enqueued.contains(&index) {
                        guard.enqueued.push(index);
                    }
                    (index, pttl)
                }
                // Redis is away: try again soon.
                Err(e) if keep_trying(request, &e) => {
                    (0, self.retry_pause(&mut pause).as_millis() as i64)
                }
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(request.wait.give_up(&request.keys[index]));
            }
            let fallback = self.quiet_period(waiting, &mut pause);
            let mut until = now + fallback;
            if pttl > 0 {
                until = until.min(now + Duration::from_millis(pttl as u64 + 1));
            }
            if let Some(r) = remaining {
                until = until.min(now + r);
            }
            let span = span.get_or_insert_with(|| wait_span(&request.keys[index]));
            waiter.sleep_until(until).instrument(span.clone()).await;
            waiter.take_woken();
            self.check_open()?;
        }
    }

    /// How long a waiter sleeps without news: the fallback period while
    /// notifications arrive, a jittered backoff (`pause`) while they cannot.
    fn quiet_period(&self, waiting: &Waiting, pause: &mut Duration) -> Duration {
        if waiting.is_subscribed() {
            self.inner.fallback
        } else {
            *pause = (*pause * 2).min(RETRY_MAX);
            pause.mul_f64(0.5 + 0.5 * unit_random())
        }
    }

    /// A jittered backoff (`pause`), for attempts while Redis is away.
    fn retry_pause(&self, pause: &mut Duration) -> Duration {
        *pause = (*pause * 2).min(RETRY_MAX);
        pause.mul_f64(0.5 + 0.5 * unit_random())
    }

    /// How long a queue must live for this request's wait.
    fn queue_ttl_ms(&self, request: &AcquireRequest) -> u64 {
        let wait = request
            .wait
            .remaining()
            .unwrap_or(QUEUE_TTL_MAX)
            .min(QUEUE_TTL_MAX);
        millis_ceil(wait) + self.inner.claim_ms + 1000
    }

    /// [`withdraw`](Self::withdraw) in the background (from a `Drop`).
    fn withdraw_later(&self, lock_key: String, wake_entry: bool) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let provider = self.clone();
            runtime.spawn(async move { provider.withdraw(&lock_key, wake_entry).await });
        }
    }

    /// Takes this process's entry out of the queue of `lock_key`, passing
    /// on a reservation made for it.
    async fn withdraw(&self, lock_key: &str, wake_entry: bool) {
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
        let args = [
            entry.as_str(),
            waiting.pid.as_str(),
            claim.as_str(),
            waiting.channel_prefix.as_str(),
        ];
        if let Err(e) = self
            .eval("withdraw", &scripts::WITHDRAW, &keys, &args)
            .await
        {
            tracing::debug!("withdrawing from the queue of {lock_key} failed: {e}");
        }
    }
}

/// Whether a waiting acquisition should try again after `e`: a backend
/// failure that may pass (no connection, no reply), with time left before
/// the deadline. An attempt without a reply may have taken the locks; a
/// later attempt with the same nonce finds them its own.
fn keep_trying(request: &AcquireRequest, e: &LockError) -> bool {
    let passing = matches!(
        e,
        LockError::Backend(b) if matches!(b.kind(), BackendErrorKind::Unavailable | BackendErrorKind::OutcomeUnknown)
    );
    passing && request.wait.remaining() != Some(Duration::ZERO)
}

fn wait_span(key: &str) -> tracing::Span {
    tracing::trace_span!("lockstep.wait", provider = "locking-redis", key = %key)
}

fn foreign(request: &AcquireRequest, index: usize) -> LockError {
    let key = request.keys.get(index).unwrap_or(&request.keys[0]);
    LockError::ForeignValue { key: key.clone() }
}

/// Keeps a single-key waiter's local registration honest however its call
/// ends: on drop (return, error, or a dropped future) it leaves the local
/// queue, and withdraws the process's Redis queue entry when it was the
/// last local waiter.
struct LocalGuard<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    waiter: &'a Arc<Waiter>,
    key: Option<String>,
}

impl LocalGuard<'_> {
    /// Leaves the local queue now. `acquired`: the call holds the lock, so
    /// the process's queue entry was already dealt with by the script.
    fn finish(&mut self, acquired: bool) {
        if acquired {
            if let Some(key) = self.key.take() {
                self.waiting.leave_single(&key, self.waiter);
            }
        } else {
            self.leave();
        }
    }

    /// Leaves the local queue, withdrawing from Redis if it was the last
    /// local waiter.
    fn leave(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        if self.waiting.leave_single(&key, self.waiter) == Left::Last {
            self.provider.withdraw_later(key, false);
        }
    }
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            if self.waiting.mark_gone(self.waiter).is_some() {
                // Handed the lock after the call had decided to give up:
                // nobody will use it.
                self.provider.undo_later(
                    vec![key.clone()],
                    self.waiter.owner.clone(),
                    self.waiter.nonce.clone(),
                    None,
                );
            }
            self.leave();
        }
    }
}

/// The same for a waiter that waits to be woken (multi-key or barging): it
/// is registered for all its keys, and queued in Redis on those it found
/// held (`enqueued`, indices into `keys`).
struct WokenGuard<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    waiter: &'a Arc<Waiter>,
    keys: &'a [String],
    enqueued: Vec<usize>,
}

impl Drop for WokenGuard<'_> {
    fn drop(&mut self) {
        for (i, key) in self.keys.iter().enumerate() {
            let last = self.waiting.leave_other(key, self.waiter) == Left::Last;
            if last && self.enqueued.contains(&i) {
                self.provider.withdraw_later(key.clone(), true);
            }
        }
    }
}

/// Undoes an acquisition whose reply never arrived, when dropped armed: on
/// an "outcome unknown" error, and when the caller's future is dropped
/// mid-call. Releases only what this acquisition took (matched by its
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
        if self.armed {
            self.provider.undo_later(
                self.keys.to_vec(),
                self.owner.to_owned(),
                self.nonce.to_owned(),
                self.expire,
            );
        }
    }
}

impl RedisProvider {
    /// Releases, in the background, whatever the acquisition `nonce` of
    /// `owner` holds among `lock_keys`.
    fn undo_later(
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
    async fn release_keys(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
        successor: Option<(&Waiter, bool)>,
    ) -> Result<(Vec<bool>, u64), LockError> {
        let layout = &self.inner.layout;
        let n = lock_keys.len();
        let mut keys = lock_keys.to_vec();
        keys.extend(lock_keys.iter().map(|k| layout.fence_key_of(k)));
        keys.extend(lock_keys.iter().map(|k| layout.queue_key(k)));
        if !owner.is_empty() {
            keys.push(layout.owner_index(owner));
        }
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
            self.channel_prefix().to_owned(),
            if owner.is_empty() { "0" } else { "1" }.to_owned(),
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

    async fn release_inner(
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
            let index = index.max(1) as usize - 1;
            Ok(AcquireReply::Foreign {
                index: if index < n { index } else { 0 },
            })
        }
        _ => Err(bad("unknown status")),
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
    let tls = url.starts_with("rediss://");
    if config.tls_root_cert.is_some() && !tls {
        return Err(ConfigError::InvalidSetting {
            name: "tls_root_cert",
            reason: "is only used with rediss:// URLs".into(),
        });
    }
    #[cfg(feature = "tls")]
    if tls {
        // redis-rs's rustls comes without a crypto provider: install ring's
        // (a no-op if the application installed one first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Some(path) = &config.tls_root_cert {
            let pem = std::fs::read(path).map_err(|e| ConfigError::InvalidSetting {
                name: "tls_root_cert",
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            return redis::Client::build_with_tls(info, certificates)
                .map_err(|e| invalid(e.to_string()));
        }
    }
    redis::Client::open(info).map_err(|e| invalid(e.to_string()))
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
