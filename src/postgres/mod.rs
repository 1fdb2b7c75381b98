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
//!   index, `queue` table, `tokens` sequence and its `floor`, and the
//!   functions `acquire`, `release`, `extend`, `release_all`,
//!   `force_release`, `withdraw` (and `lock_keys`, the sorted advisory
//!   locks they all take first, `serve_queue`, `floor_tokens`).
//! - `acquire.rs`: one attempt, the drop guard that undoes an attempt whose
//!   outcome is unknown (by its nonce, on the same connection first), and
//!   the wait loop.
//! - `queue.rs`: the provider's local waiters per key (behind its one
//!   queue entry) and the withdrawal of that entry when the last leaves.
//! - `listen.rs`: the LISTEN connection (reconnected in the background).
//! - `ops.rs`: release, extend, release_all, force_release, inspect, list.
//! - `error.rs`: tokio-postgres and pool failures as `BackendError`s.
//!
//! # Model
//!
//! A row of `<schema>.locks` is a lock: key, owner (NULL: anonymous), the
//! nonce of the acquisition that took it, the newest fencing token (from
//! the sequence `<schema>.tokens`, global, so tokens of a key grow across
//! releases and expiries, and floored at the server's clock after each
//! server start, so they grow across crashes too), when it was taken, when
//! it expires (NULL: never; by the server's clock only) and the holder's
//! metadata. A row with `reserved_for` set is a *reservation*: the lock was
//! released to the waiting provider at the head of the key's queue, which
//! claims it with its next attempt (it lapses after a second unclaimed).
//! Each function runs in its statement's own transaction and first takes
//! `pg_advisory_xact_lock` on the hashes of its keys in ascending order:
//! released at commit, never left open, and opposite key orders cannot
//! deadlock.
//!
//! Waiting is FIFO across processes: a single-key waiter that finds the
//! lock held queues its provider (one entry per provider and key, in
//! `<schema>.queue`; further local waiters line up behind it in memory). A
//! release reserves the lock for the first queued provider and tells it on
//! its own channel (`NOTIFY "lockstep.<pid>"`, or in the release's reply
//! when it is the releasing provider), and that provider's first local
//! waiter claims it: providers are served in arrival order (a provider with
//! more waiters goes to the back after each turn), each provider's waiters
//! in theirs. Multi-key waiters queue wake-only entries and retry when a
//! release tells them. Nothing relies on a message: a waiter also retries
//! when the lease it saw ends and after one second (lost messages, a
//! LISTEN connection that is down, during which it does not queue). No
//! pooled connection is held while waiting; a wait's deadline also bounds
//! the statement of its attempt (cancelled on the server when it is
//! blocked).
//!
//! `LockInfo::waiting` counts the other providers queued for the key and
//! this provider's own waiting calls.

mod acquire;
mod config;
mod error;
mod handoff;
mod listen;
mod ops;
mod queue;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

pub use config::{DEFAULT_SCHEMA, ENV_POSTGRES_URL, PostgresConfig};

use crate::error::LockError;
use crate::inspect::LockInfo;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider};
use config::Names;
use listen::Listener;
use queue::KeyWaiters;

/// The provider's identifier.
const IDENTIFIER: &str = "locking-postgres";

/// How long a released lock stays reserved for the waiting provider at the
/// head of its queue before it lapses unclaimed (that provider died, or
/// missed the message). A claim takes one round trip.
const CLAIM: Duration = Duration::from_secs(1);

/// Locks in PostgreSQL, shared by every process whose provider uses the
/// same database and schema.
///
/// Clones share the pool, the LISTEN connection and the waiter registry.
#[derive(Clone, Debug)]
pub struct PostgresProvider {
    inner: Arc<Inner>,
    /// Kept for its drop: the last clone stops the LISTEN task.
    _listener: Arc<Listener>,
}

/// The SQL of each call, with the schema substituted.
#[derive(Debug)]
struct Sql {
    acquire: String,
    release: String,
    extend: String,
    release_all: String,
    force_release: String,
    withdraw: String,
    sweep: String,
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
                "SELECT idx, token, reentered, lease_ms \
                 FROM {s}.acquire($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            release: format!("SELECT {s}.release($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
            extend: format!("SELECT {s}.extend($1, $2, $3)"),
            release_all: format!("SELECT {s}.release_all($1, $2)"),
            force_release: format!(
                "SELECT idx, owner, token, acquired_at, held_ms, lease_ms, metadata \
                 FROM {s}.force_release($1, $2)"
            ),
            withdraw: format!("SELECT {s}.withdraw($1, $2, $3)"),
            sweep: format!("SELECT {s}.sweep($1)"),
            // Every key: its lock or reservation if live (else NULLs), and
            // the other providers queued for it.
            inspect: format!(
                "SELECT k.key, l.owner, l.token, l.acquired_at, \
                 greatest(0, floor(extract(epoch FROM now() - l.acquired_at) * 1000))::bigint, \
                 CASE WHEN l.expires_at IS NOT NULL THEN \
                   greatest(0, floor(extract(epoch FROM l.expires_at - now()) * 1000))::bigint END, \
                 l.metadata, l.reserved_for IS NOT NULL, \
                 (SELECT count(*) FROM {s}.queue q \
                   WHERE q.key = k.key AND q.pid <> $2 AND q.expires_at > now()) \
                 FROM unnest($1::text[]) AS k(key) \
                 LEFT JOIN {s}.locks l ON l.key = k.key AND {live}"
            ),
            list: format!(
                "SELECT {holder} FROM {s}.locks l \
                 WHERE left(l.key, length($1)) = $1 AND l.reserved_for IS NULL AND {live}"
            ),
        }
    }
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    sql: Sql,
    wait_timeout: Duration,
    /// The server's statement timeout.
    statement_timeout: Duration,
    closed: AtomicBool,
    shutdown: CancellationToken,
    /// This provider's random id in the server's wait queues; its NOTIFY
    /// channel is `lockstep.<pid>`.
    pid: String,
    /// Whether the LISTEN connection is up (only then does a waiter queue).
    listening: AtomicBool,
    /// The local waiters of each key some call of this provider waits for;
    /// removed when the last one leaves and nothing is left to withdraw.
    waiters: Mutex<HashMap<String, KeyWaiters>>,
    /// Background undos under way.
    undos: AtomicUsize,
    /// Statements sent on pooled connections (`PostgresProvider::statements`).
    statements: AtomicU64,
}

impl Inner {
    fn new(pool: Pool, names: &Names, config: &PostgresConfig) -> Self {
        Inner {
            pool,
            sql: Sql::new(&names.schema),
            wait_timeout: config.wait_timeout,
            statement_timeout: config.statement_timeout,
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            pid: uuid::Uuid::new_v4().simple().to_string(),
            listening: AtomicBool::new(false),
            waiters: Mutex::new(HashMap::new()),
            undos: AtomicUsize::new(0),
            statements: AtomicU64::new(0),
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

    /// How long a lock reserved for a waiting provider stays reserved
    /// unclaimed, in ms.
    fn claim_ms(&self) -> i64 {
        i64::try_from(CLAIM.as_millis()).unwrap_or(i64::MAX)
    }

    /// The NOTIFY channel of this provider.
    fn channel(&self) -> String {
        format!("lockstep.{}", self.pid)
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, KeyWaiters>> {
        // Every critical section is a few infallible map operations.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a statement about to be sent.
    fn sent(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
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
        self.run(operation, sql, params, true).await
    }

    /// [`query`](Self::query), counted in `statements` or not.
    async fn run(
        &self,
        operation: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        counted: bool,
    ) -> Result<Vec<Row>, LockError> {
        let client = self.client(operation).await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| error::prepare(operation, e))?;
        if counted {
            self.sent();
        }
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
            _listener: Arc::new(listener),
        }
    }
}

/// Diagnostics: for operators, tests and the bench.
impl PostgresProvider {
    /// The number of keys this provider's calls wait for right now.
    pub fn waiting_keys(&self) -> usize {
        self.inner
            .waiters()
            .values()
            .filter(|s| s.is_waited())
            .count()
    }

    /// Background work still under way: undos of acquisitions with an
    /// unknown outcome, and withdrawals of this provider's queue entries
    /// (its last waiter for a key left without the lock).
    pub fn pending_undos(&self) -> usize {
        self.inner.undos.load(Ordering::Acquire)
    }

    /// How many statements this provider has sent on its pooled
    /// connections: each one transaction and, once its connection has
    /// prepared it, one round trip: attempts, releases, undos, withdrawals
    /// and the rest. The background sweep and the LISTEN connection's
    /// traffic are not counted.
    pub fn statements(&self) -> u64 {
        self.inner.statements.load(Ordering::Relaxed)
    }

    /// Whether the LISTEN connection is up (waiters poll once a second
    /// while it is not).
    pub fn is_listening(&self) -> bool {
        self.inner.listening.load(Ordering::Acquire)
    }

    /// Deletes expired locks, lapsed reservations and expired queue entries
    /// (at most 100 keys of each per call): rows of keys nobody takes again,
    /// which would stay for ever. The provider's LISTEN task does this once
    /// a minute; an operator may call it at any time. Returns how many rows
    /// went.
    ///
    /// # Errors
    ///
    /// [`LockError::Backend`] when the statement fails.
    ///
    /// # Cancel safety
    ///
    /// Dropped, the statement may or may not have run; either is harmless.
    pub async fn sweep(&self) -> Result<u64, LockError> {
        self.inner.sweep().await
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
