//! The shared connection lock operations run on, and error classification.
//!
//! Every lock operation of a provider goes through one multiplexed
//! connection: commands from all tasks are pipelined on it without waiting
//! for each other. Taking a pooled connection per operation would cost an
//! extra round trip (deadpool's recycle check) and measured 3-5x slower
//! with 64 concurrent tasks. The deadpool pool is the connection *factory*:
//! it owns the URL, credentials and timeouts, and supplies the shared
//! connection and its replacement after a failure. On a Redis Cluster
//! (feature `cluster`) the shared connection is redis-rs's cluster
//! connection, which routes each call to the master of its slot and follows
//! MOVED, ASK and failovers itself.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::{Connection, Pool, PoolError};
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::time::{Instant, timeout};

use crate::error::{BackendError, BackendErrorKind, LockError};

/// After a failed reconnect, calls fail fast for this long instead of each
/// waiting for its own connect timeout.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// The shared connection: to one server, or to a cluster.
#[derive(Clone)]
pub(crate) enum Link {
    Single(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Link {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// Where the shared connection comes from.
pub(crate) enum Source {
    /// A deadpool pool for one server. Replaced when the master moves (a
    /// Sentinel failover).
    Pool(std::sync::RwLock<Pool>),
    /// A cluster client.
    #[cfg(feature = "cluster")]
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Source {
    /// One server's pool.
    pub(crate) fn single(pool: Pool) -> Source {
        Source::Pool(std::sync::RwLock::new(pool))
    }
}

pub(crate) struct Connections {
    source: Source,
    /// The shared connection and its generation number.
    current: Mutex<Option<(u64, Link)>>,
    /// Serialises reconnects, so that a broken connection is replaced once.
    reconnect: tokio::sync::Mutex<Option<(Instant, String)>>,
    generation: AtomicU64,
    connect_timeout: Duration,
    response_timeout: Duration,
    closed: AtomicBool,
    /// Requests sent on the shared connection.
    sent: AtomicU64,
}

impl Connections {
    pub(crate) fn new(
        source: Source,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        Connections {
            source,
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            connect_timeout,
            response_timeout,
            closed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        }
    }

    /// The current pool (none on a cluster).
    pub(crate) fn pool(&self) -> Option<Pool> {
        match &self.source {
            Source::Pool(p) => Some(p.read().unwrap_or_else(|e| e.into_inner()).clone()),
            #[cfg(feature = "cluster")]
            Source::Cluster(_) => None,
        }
    }

    /// Whether the shared connection is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self.source, Source::Pool(_))
    }

    #[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
    /// Points every later call at `pool` (a new master): the shared
    /// connection is dropped (its calls in flight finish or fail alone) and
    /// the old pool closed.
    pub(crate) fn retarget(&self, pool: Pool) {
        #[allow(irrefutable_let_patterns)] // without the `cluster` feature
        let Source::Pool(current) = &self.source else {
            return;
        };
        let old = std::mem::replace(
            &mut *current.write().unwrap_or_else(|e| e.into_inner()),
            pool,
        );
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        old.close();
    }

    /// How many requests were sent on the shared connection so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn cached(&self) -> Option<(u64, Link)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The shared connection, connecting if there is none.
    pub(crate) async fn get(&self) -> Result<(u64, Link), RawError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut last_failure = self.reconnect.lock().await;
        // Someone else may have reconnected while we waited for the mutex.
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        if let Some((at, reason)) = last_failure.as_ref()
            && at.elapsed() < RECONNECT_BACKOFF
        {
            return Err(RawError::Connect(reason.clone(), None));
        }
        match self.connect().await {
            Ok(conn) => {
                *last_failure = None;
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((generation, conn.clone()));
                Ok((generation, conn))
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    async fn connect(&self) -> Result<Link, RawError> {
        if self.is_closed() {
            return Err(RawError::Closed);
        }
        let pool = match &self.source {
            Source::Pool(p) => p.read().unwrap_or_else(|e| e.into_inner()).clone(),
            #[cfg(feature = "cluster")]
            Source::Cluster(client) => {
                return match timeout(self.connect_timeout, client.get_async_connection()).await {
                    Ok(Ok(conn)) => Ok(Link::Cluster(conn)),
                    Ok(Err(e)) => Err(RawError::Redis(e)),
                    Err(_) => Err(RawError::Connect(
                        format!("no cluster connection within {:?}", self.connect_timeout),
                        None,
                    )),
                };
            }
        };
        self.checkout(&pool)
            .await
            .map(|conn| Link::Single(Connection::take(conn)))
    }

    /// A connection of `pool`'s, within the connect timeout.
    async fn checkout(&self, pool: &Pool) -> Result<deadpool_redis::Connection, RawError> {
        match timeout(self.connect_timeout, pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(PoolError::Backend(e))) => Err(RawError::Redis(e)),
            Ok(Err(PoolError::Closed)) => Err(RawError::Closed),
            Ok(Err(e)) => Err(RawError::Connect(e.to_string(), None)),
            Err(_) => Err(RawError::Connect(
                format!("no connection within {:?}", self.connect_timeout),
                None,
            )),
        }
    }

    /// Forgets the shared connection if it is still generation `generation`.
    pub(crate) fn invalidate(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// Runs `f` on the shared connection within the response timeout.
    pub(crate) async fn run<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, LockError>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_within(operation, self.response_timeout, f).await
    }

    /// Runs `f` on the shared connection within `limit`.
    pub(crate) async fn run_within<T, F, Fut>(
        &self,
        operation: &'static str,
        limit: Duration,
        f: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (generation, conn) = self
            .get()
            .await
            .map_err(|e| e.into_lock_error(operation, false))?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        match timeout(limit, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if breaks_connection(&e) {
                    self.invalidate(generation);
                }
                Err(RawError::Redis(e).into_lock_error(operation, true))
            }
            Err(_) => {
                // A stalled or partitioned server: start afresh next time.
                // The old connection finishes (or fails) its requests alone.
                self.invalidate(generation);
                Err(no_reply(operation, limit))
            }
        }
    }

    /// Runs `f` on a connection of the pool's that no one else uses
    /// meanwhile (for commands that must follow each other on one client,
    /// like a write and the `WAIT` for it), within `limit`.
    pub(crate) async fn run_exclusive<T, F, Fut>(
        &self,
        operation: &'static str,
        limit: Duration,
        f: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if self.is_closed() {
            return Err(RawError::Closed.into_lock_error(operation, false));
        }
        let Some(pool) = self.pool() else {
            return Err(RawError::Connect("no pool on a cluster".into(), None)
                .into_lock_error(operation, false));
        };
        let conn = self
            .checkout(&pool)
            .await
            .map_err(|e| e.into_lock_error(operation, false))?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        match timeout(limit, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RawError::Redis(e).into_lock_error(operation, true)),
            Err(_) => Err(no_reply(operation, limit)),
        }
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(pool) = self.pool() {
            pool.close();
        }
    }
}

/// A request sent that got no reply within `limit`: it may have run.
fn no_reply(operation: &'static str, limit: Duration) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::OutcomeUnknown,
        operation,
        format!("no reply within {limit:?}"),
        None,
    ))
}

/// A failure before it is classified.
#[derive(Debug)]
pub(crate) enum RawError {
    Redis(RedisError),
    Connect(String, Option<RedisError>),
    Closed,
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Redis(e) => write!(f, "{e}"),
            RawError::Connect(reason, _) => f.write_str(reason),
            RawError::Closed => f.write_str("the provider has been shut down"),
        }
    }
}

impl RawError {
    /// Classifies the failure. `sent` says whether the request may have
    /// reached the server, which turns connection failures into "outcome
    /// unknown".
    pub(crate) fn into_lock_error(self, operation: &'static str, sent: bool) -> LockError {
        let (kind, message, source) = match self {
            RawError::Closed => {
                return LockError::Shutdown {
                    provider: "locking-redis".into(),
                };
            }
            RawError::Connect(reason, source) => (
                BackendErrorKind::Unavailable,
                reason,
                source.map(|e| Box::new(e) as _),
            ),
            RawError::Redis(e) => {
                let kind = if is_auth_error(&e) {
                    BackendErrorKind::Auth
                } else if e.is_connection_refusal()
                    || !sent && e.is_io_error()
                    || refused_for_now(&e)
                    // A cluster node the client has no connection to (it
                    // reconnects from the seed nodes).
                    || e.kind() == ErrorKind::ClusterConnectionNotFound
                {
                    BackendErrorKind::Unavailable
                } else if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    BackendErrorKind::OutcomeUnknown
                } else {
                    BackendErrorKind::Server
                };
                (kind, e.to_string(), Some(Box::new(e) as _))
            }
        };
        LockError::Backend(BackendError::new(kind, operation, message, source))
    }
}

/// A server that refused the request without running it, for a reason that
/// passes: loading its data after a restart, a failover in progress, a
/// cluster slot moving (a redirection the client could not follow within
/// its retries).
fn refused_for_now(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        )
    )
}

/// Whether the connection must be replaced after this error.
fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Wrong credentials, missing AUTH, or a missing ACL permission.
pub(crate) fn is_auth_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        // Errors inside a script (a missing key permission) carry the code
        // only in their text.
        || ["NOAUTH", "WRONGPASS", "NOPERM"]
            .iter()
            .any(|code| e.to_string().contains(code))
}
