//! The shared connection lock operations run on.
//!
//! Every lock operation of a provider goes through one multiplexed
//! connection: commands from all tasks are pipelined on it without waiting
//! for each other. Taking a pooled connection per operation would cost an
//! extra round trip (deadpool's recycle check) and measured 3-5x slower
//! with 64 concurrent tasks. The deadpool pool is the connection *factory*:
//! it owns the URL, credentials and timeouts, and supplies the shared
//! connection and its replacement after a failure. On a Redis Cluster the
//! shared connection is redis-rs's cluster connection, which routes each
//! call to the master of its slot and follows MOVED, ASK and failovers
//! itself (see `topology.rs` for where the two differ).

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::{Pool, PoolError};
use redis::{RedisError, Value};
use tokio::time::{Instant, timeout};

use super::error::{RawError, breaks_connection, is_auth_error, no_reply};
use super::scripts::{self, Arg, Lua};
use super::topology::{Link, Source};
use crate::error::LockError;

/// After a failed reconnect, calls fail fast for this long instead of each
/// waiting for its own connect timeout.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// The shared connection, the source of its replacements, and the
/// provider's open/closed state.
pub(crate) struct Connections {
    pub(super) source: Source,
    /// The shared connection, its generation number, and the server's id
    /// for it (`CLIENT ID`; none on a cluster).
    pub(super) current: Mutex<Option<(u64, Link, Option<i64>)>>,
    /// The server's ids of connections given up on while a request may
    /// still have been on its way (see [`fence`](Self::fence)).
    stale: Mutex<Vec<i64>>,
    /// Serialises reconnects, so that a broken connection is replaced once.
    reconnect: tokio::sync::Mutex<Option<(Instant, String)>>,
    generation: AtomicU64,
    connect_timeout: Duration,
    response_timeout: Duration,
    closed: AtomicBool,
    /// Requests sent on the shared connection.
    sent: AtomicU64,
    /// Whether scripts run as the library's functions (`FCALL`): set at
    /// startup unless the server or user refuses functions, cleared for
    /// good if that turns out later (see `scripts::invoke`).
    pub(crate) functions: AtomicBool,
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
            stale: Mutex::new(Vec::new()),
            reconnect: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            connect_timeout,
            response_timeout,
            closed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            functions: AtomicBool::new(false),
        }
    }

    /// The current pool (none on a cluster).
    pub(crate) fn pool(&self) -> Option<Pool> {
        self.source.pool()
    }

    /// How many requests were sent on the shared connection so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `Err(Shutdown)` once the provider was shut down.
    pub(crate) fn check_open(&self) -> Result<(), LockError> {
        if self.is_closed() {
            return Err(RawError::Closed.into_lock_error("", false));
        }
        Ok(())
    }

    fn cached(&self) -> Option<(u64, Link)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(g, link, _)| (*g, link.clone()))
    }

    /// The shared connection, connecting if there is none.
    pub(crate) async fn get(&self) -> Result<(u64, Link), RawError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        // Boxed: connecting is a future of kilobytes, and inline it would
        // be allocated and copied with every command.
        Box::pin(self.reconnect()).await
    }

    /// [`get`](Self::get) without a connection: makes one, unless another
    /// call just did, or failed too recently to try again.
    async fn reconnect(&self) -> Result<(u64, Link), RawError> {
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
        if self.is_closed() {
            return Err(RawError::Closed);
        }
        match self.source.connect(self.connect_timeout).await {
            Ok(mut conn) => {
                *last_failure = None;
                let id = client_id(&mut conn, self.connect_timeout).await;
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((generation, conn.clone(), id));
                Ok((generation, conn))
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// A connection of `pool`'s, within the connect timeout.
    pub(crate) async fn checkout(
        &self,
        pool: &Pool,
    ) -> Result<deadpool_redis::Connection, RawError> {
        checkout(pool, self.connect_timeout).await
    }

    /// Forgets the shared connection if it is still generation
    /// `generation`. Requests sent on it may still be on their way: its id
    /// is kept for [`fence`](Self::fence).
    pub(crate) fn invalidate(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(g, _, _)| *g == generation)
            && let Some((_, _, Some(id))) = current.take()
        {
            self.stale
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id);
        }
    }

    /// Closes, on the server, the connections given up on since the last
    /// fence, so that a request still on its way on one of them (delayed
    /// packets, a stalled proxy) can never run after what follows on the
    /// shared connection: an undo by nonce sent after the fence cannot be
    /// overtaken by the acquisition it undoes. Returns whether every such
    /// connection could be closed (not with an ACL user lacking `CLIENT
    /// KILL`; the caller then repeats its undo later).
    ///
    /// # Errors
    ///
    /// A failure to reach Redis; the ids are kept for the next fence.
    pub(crate) async fn fence(&self) -> Result<bool, LockError> {
        let ids = std::mem::take(&mut *self.stale.lock().unwrap_or_else(|e| e.into_inner()));
        if ids.is_empty() {
            return Ok(true);
        }
        let killed = self
            .run("fence", |mut conn| {
                let ids = ids.clone();
                async move {
                    let mut all = true;
                    for id in ids {
                        let reply = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("ID")
                            .arg(id)
                            .query_async::<i64>(&mut conn)
                            .await;
                        match reply {
                            // 0: closed already.
                            Ok(_) => {}
                            Err(e) if is_auth_error(&e) => all = false,
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(all)
                }
            })
            .await;
        if killed.is_err() {
            self.stale
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(ids);
        }
        killed
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

    /// Runs `script` with `keys` and `args` on the shared connection
    /// (`FCALL` or `EVALSHA`, loading what the server lacks; see
    /// `scripts::invoke`).
    pub(crate) async fn eval(
        &self,
        operation: &'static str,
        script: &'static Lua,
        keys: &[String],
        args: &[Arg<'_>],
    ) -> Result<Value, LockError> {
        // Boxed: inline, it would make every waiting acquisition larger.
        Box::pin(self.run(operation, |mut conn| async move {
            scripts::invoke(&mut conn, script, keys, args, &self.functions).await
        }))
        .await
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

/// The server's id for a connection to one server (`CLIENT ID`), if it
/// answers within `limit`.
async fn client_id(link: &mut Link, limit: Duration) -> Option<i64> {
    if !link.is_single() {
        return None;
    }
    timeout(
        limit,
        redis::cmd("CLIENT").arg("ID").query_async::<i64>(link),
    )
    .await
    .ok()?
    .ok()
}

/// A connection of `pool`'s within `limit`.
pub(crate) async fn checkout(
    pool: &Pool,
    limit: Duration,
) -> Result<deadpool_redis::Connection, RawError> {
    match timeout(limit, pool.get()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(PoolError::Backend(e))) => Err(RawError::Redis(e)),
        Ok(Err(PoolError::Closed)) => Err(RawError::Closed),
        Ok(Err(e)) => Err(RawError::Connect(e.to_string(), None)),
        Err(_) => Err(RawError::Connect(
            format!("no connection within {limit:?}"),
            None,
        )),
    }
}
