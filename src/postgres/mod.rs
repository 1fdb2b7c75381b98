//! The PostgreSQL provider (feature `postgres`): locks in one table, every
//! operation one statement calling a plpgsql function.
//!
//! # Layout
//!
//! - `mod.rs`: [`PostgresProvider`], its shared state (`Inner`: the pool,
//!   the SQL texts, the waiter registry) and the [`LockingProvider`] impl as
//!   short delegations.
//! - `config.rs`: [`PostgresConfig`], `connect` / `from_pool`, the schema
//!   name's checks and the DDL's substitution.
//! - `schema.sql`: the DDL (idempotent): schema, `locks` table, owner
//!   index, `tokens` sequence, and the functions `acquire`, `release`,
//!   `extend`, `release_all`, `force_release` (and `lock_keys`, the sorted
//!   advisory locks they all take first).
//! - `acquire.rs`: one attempt, the drop guard that undoes an attempt whose
//!   outcome is unknown (by its nonce, on the same connection first), and
//!   the wait loop.
//! - `listen.rs`: the LISTEN connection (reconnected in the background) and
//!   the local registry of waiters it wakes.
//! - `ops.rs`: release, extend, release_all, force_release, inspect, list.
//! - `error.rs`: tokio-postgres and pool failures as `BackendError`s.
//!
//! # Model
//!
//! A row of `<schema>.locks` is a lock: key, owner (NULL: anonymous), the
//! nonce of the acquisition that took it, the newest fencing token (from
//! the sequence `<schema>.tokens`, global, so tokens of a key grow across
//! releases, expiries and restarts), when it was taken, when it expires
//! (NULL: never; by the server's clock only) and the holder's metadata.
//! Each function runs in its statement's own transaction and first takes
//! `pg_advisory_xact_lock` on the hashes of its keys in ascending order:
//! released at commit, never left open, and opposite key orders cannot
//! deadlock.
//!
//! Waiters sleep on a local `Notify` per key, woken by the provider's
//! LISTEN connection when a function sends `pg_notify` for a key it
//! released or whose lease it changed, or when the holder's lease as the
//! attempt saw it runs out, or after one second (lost notifications, a
//! dropped LISTEN connection). No pooled connection is held while waiting.
//! Waiters are **not** served in arrival order across processes.
//!
//! `LockInfo::waiting` counts this provider's own waiting calls on the key
//! (other processes' waiters are not visible).

mod acquire;
mod config;
mod error;
mod listen;
mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::sync::Notify;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

pub use config::{DEFAULT_SCHEMA, ENV_POSTGRES_URL, PostgresConfig};

use crate::error::LockError;
use crate::inspect::LockInfo;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider};
use config::Names;
use listen::Listener;

/// The provider's identifier.
const IDENTIFIER: &str = "locking-postgres";

/// Locks in PostgreSQL, shared by every process whose provider uses the
/// same database and schema.
///
/// Clones share the pool, the LISTEN connection and the waiter registry.
#[derive(Clone, Debug)]
pub struct PostgresProvider {
    inner: Arc<Inner>,
    listener: Arc<Listener>,
}

/// The SQL of each call, with the schema substituted.
#[derive(Debug)]
struct Sql {
    acquire: String,
    release: String,
    extend: String,
    release_all: String,
    force_release: String,
    inspect: String,
    list: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        let holder = "l.key, l.owner, l.token, l.acquired_at, \
             greatest(0, floor(extract(epoch FROM now() - l.acquired_at) * 1000))::bigint, \
             CASE WHEN l.expires_at IS NOT NULL THEN \
               greatest(0, floor(extract(epoch FROM l.expires_at - now()) * 1000))::bigint END, \
             l.metadata";
        let live = "(l.expires_at IS NULL OR l.expires_at > now())";
        Sql {
            acquire: format!(
                "SELECT idx, token, reentered, lease_ms FROM {s}.acquire($1, $2, $3, $4, $5)"
            ),
            release: format!("SELECT {s}.release($1, $2, $3)"),
            extend: format!("SELECT {s}.extend($1, $2, $3)"),
            release_all: format!("SELECT {s}.release_all($1)"),
            force_release: format!(
                "SELECT idx, owner, token, acquired_at, held_ms, lease_ms, metadata \
                 FROM {s}.force_release($1)"
            ),
            inspect: format!("SELECT {holder} FROM {s}.locks l WHERE l.key = ANY ($1) AND {live}"),
            list: format!(
                "SELECT {holder} FROM {s}.locks l \
                 WHERE left(l.key, length($1)) = $1 AND {live}"
            ),
        }
    }
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    names: Names,
    sql: Sql,
    wait_timeout: Duration,
    /// The server's statement timeout.
    statement_timeout: Duration,
    closed: AtomicBool,
    shutdown: CancellationToken,
    /// One `Notify` per key that a call of this provider waits for; removed
    /// when its last waiter leaves.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// Background undos under way.
    undos: AtomicUsize,
}

impl Inner {
    fn new(pool: Pool, names: Names, config: &PostgresConfig) -> Self {
        Inner {
            pool,
            sql: Sql::new(&names.schema),
            names,
            wait_timeout: config.wait_timeout,
            statement_timeout: config.statement_timeout,
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            waiters: Mutex::new(HashMap::new()),
            undos: AtomicUsize::new(0),
        }
    }

    /// The client's own bound on a statement: the server's timeout plus a
    /// margin, so that the server's (a known outcome) normally comes first.
    fn client_timeout(&self) -> Duration {
        self.statement_timeout + Duration::from_secs(1)
    }

    fn check_open(&self) -> Result<(), LockError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LockError::Shutdown {
                provider: IDENTIFIER.into(),
            });
        }
        Ok(())
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // Every critical section is a few infallible map operations.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pooled connection.
    async fn client(&self, operation: &'static str) -> Result<Object, LockError> {
        self.check_open()?;
        self.pool
            .get()
            .await
            .map_err(|e| error::unavailable(operation, e))
    }

    /// Runs one statement on a pooled connection. A statement without a
    /// reply in time takes its connection out of the pool.
    ///
    /// Dropped mid-statement, the connection goes back to the pool: the
    /// statement is one autocommit call, so no transaction stays open, and
    /// tokio-postgres discards the reply of a dropped request in order.
    async fn query(
        &self,
        operation: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, LockError> {
        let client = self.client(operation).await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| error::prepare(operation, e))?;
        match tokio::time::timeout(self.client_timeout(), client.query(&statement, params)).await {
            Err(_) => {
                drop(Object::take(client));
                Err(error::timed_out(operation, self.client_timeout()))
            }
            Ok(Err(e)) => Err(error::statement(operation, e)),
            Ok(Ok(rows)) => Ok(rows),
        }
    }
}

impl PostgresProvider {
    fn assemble(inner: Arc<Inner>, listener: Listener) -> Self {
        PostgresProvider {
            inner,
            listener: Arc::new(listener),
        }
    }
}

/// Diagnostics: for operators, tests and the bench.
impl PostgresProvider {
    /// The number of keys this provider's calls wait for right now (each
    /// has one registry entry, removed when its last waiter leaves).
    pub fn waiting_keys(&self) -> usize {
        self.inner.waiters().len()
    }

    /// Undos of acquisitions with an unknown outcome still under way.
    pub fn pending_undos(&self) -> usize {
        self.inner.undos.load(Ordering::Acquire)
    }

    /// Whether the LISTEN connection is up (waiters poll once a second
    /// while it is not).
    pub fn is_listening(&self) -> bool {
        self.listener.is_up()
    }

    /// The pool, e.g. for metrics of its own.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }
}

impl LockingProvider for PostgresProvider {
    fn identifier(&self) -> &'static str {
        IDENTIFIER
    }

    fn default_wait_timeout(&self) -> Duration {
        self.inner.wait_timeout
    }

    fn acquire<'a>(
        &'a self,
        request: &'a AcquireRequest,
    ) -> BoxFuture<'a, Result<Acquired, LockError>> {
        Box::pin(self.inner.acquire(request))
    }

    fn release<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<bool>, LockError>> {
        Box::pin(self.inner.release(keys, owner, ""))
    }

    fn extend<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), LockError>> {
        Box::pin(self.inner.extend(keys, owner, lease))
    }

    fn release_all<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, LockError>> {
        Box::pin(self.inner.release_all(owner))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.inner.shut_down())
    }

    fn inspect<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(self.inner.inspect(keys))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(self.inner.list(prefix))
    }

    fn force_release<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<LockInfo>>, LockError>> {
        Box::pin(self.inner.force_release(keys))
    }
}
