//! Distributed locks for workflows, backed by Redis: Medusa's Locking Module,
//! in Rust, without its sharp edges.
//!
//! # Layout
//!
//! The user API is at the root; [`provider`] is the backend SPI, for
//! writing a provider of your own; [`workflow`] is the workflow engine.
//!
//! - [`LockingModule`] (`module.rs`, `execute.rs`): the service. `execute`,
//!   `acquire`, `release`, `release_all` and `extend`, routed to a provider
//!   by id; `execute`'s job gets a [`Held`] (fencing tokens, loss signal).
//! - [`Lease`] (`lease.rs`): what an acquisition returns: owner and fencing
//!   tokens; [`LeaseGuard`], a lease released when dropped.
//! - [`LockInfo`] (`inspect.rs`): who holds a lock, since when, who waits;
//!   `inspect`, `locks` and `force_release`, and holder metadata.
//! - [`Keys`] (`keys.rs`) and the options (`options.rs`): call inputs.
//! - [`LockError`], [`ConfigError`] (`error.rs`).
//! - [`provider`] (`provider.rs`): the trait a backend implements, and its
//!   contract.
//! - [`InMemoryProvider`] (`memory.rs`): locks in this process; the default.
//! - [`RedisProvider`] (`redis/`, feature `redis`): locks in Redis for many
//!   processes, on one server, a Sentinel-managed master or a Redis
//!   Cluster; `redis/mod.rs` maps its files.
//! - `PostgresProvider` (`postgres/`, feature `postgres`): locks in a
//!   PostgreSQL table, one plpgsql function call per operation;
//!   `postgres/mod.rs` maps its files.
//! - [`RedlockProvider`] (`redlock.rs`, feature `redlock`): one lock across
//!   a majority of independent Redis masters.
//! - [`workflow`] (`workflow/`): a small workflow engine with compensation,
//!   and Medusa's `acquire_lock_step` / `release_lock_step`.
//! - `gate.rs`: what a provider knows of its own locks, so that its
//!   multi-key waiters do not retry into attempts bound to fail.
//! - `backoff.rs`: the one jittered backoff every retry loop uses;
//!   `retry.rs`: riding out transient failures for releases; `token.rs`:
//!   random owners and run ids; `random.rs`: cheap random bits for nonces
//!   and jitter.
//! - [`metrics`] (`metrics.rs`, feature `metrics`): the metric names and
//!   their labels (its docs are the reference), and the one-line recording
//!   helpers the call sites use (no-ops without the feature).
//!
//! Names: a *lease* is how long a lock lives unless extended; Medusa calls
//! it `expire` in the module's options and `ttl` in the lock steps, and
//! lockstep keeps those names. [`Lease`] is what `acquire` hands back,
//! [`Held`] what `execute`'s job borrows, and
//! [`AcquiredLock`](workflow::AcquiredLock) what the acquire step outputs.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), lockstep::LockError> {
//! use std::time::Duration;
//! use lockstep::{AcquireOptions, LockingModule};
//!
//! let locking = LockingModule::new(); // in-memory; see RedisProvider for many processes
//! let lease = locking
//!     .acquire(
//!         "order_1",
//!         AcquireOptions::new().owner_id("run-1").expire(Duration::from_secs(10)),
//!     )
//!     .await?;
//! let token = lease.fencing_token(); // pass it with every write the lock guards
//! assert!(token > 0);
//! assert!(lease.release().await?);
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `redis` (default): the Redis provider.
//! - `serde`: `Deserialize` for [`RedisConfig`] (and `PostgresConfig` with `postgres`).
//! - `tls`: `rediss://` URLs (rustls), with a private CA if needed.
//! - `sentinel`: find the master through Redis Sentinel and follow failovers
//!   (`RedisConfig::from_sentinels`).
//! - `cluster`: Redis Cluster, locks sharded by hash slot
//!   (`RedisConfig::from_cluster`).
//! - `redlock`: [`RedlockProvider`], a quorum of independent masters.
//! - `postgres`: `PostgresProvider`, locks in PostgreSQL (tokio-postgres and
//!   deadpool-postgres); waiters woken by LISTEN/NOTIFY.
//! - `metrics`: acquisition, hold, renewal, lease-loss, waiting, wake-up and
//!   script-reload series (`lockstep_*`, listed in [`metrics`]) through the
//!   `metrics` facade, into
//!   the recorder the program installs; labels are bounded (provider id,
//!   outcome, cause, script name). Without it nothing is compiled in.
//!
//! The command line (`lockstep demo`, `bench`, `torture`, ...) is the
//! `lockstep-cli` package of this repository: a program that uses the
//! library compiles none of it.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "redis")]
mod backoff;
mod error;
mod execute;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod gate;
mod inspect;
mod keys;
mod lease;
mod memory;
pub mod metrics;
mod module;
mod options;
#[cfg(feature = "postgres")]
mod postgres;
pub mod provider;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod random;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redlock")]
mod redlock;
mod retry;
mod token;
pub mod workflow;

/// The pool [`PostgresProvider::from_pool`] takes, at the version lockstep
/// is built with.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;
pub use error::{BackendError, BackendErrorKind, ConfigError, InvalidInput, LockError};
pub use execute::Held;
pub use inspect::{LockHolder, LockInfo, LockState, MAX_METADATA_LEN};
pub use keys::{Keys, MAX_KEY_LEN, MAX_KEYS, MAX_OWNER_LEN};
pub use lease::{Lease, LeaseGuard};
pub use memory::InMemoryProvider;
pub use module::{IN_MEMORY_PROVIDER_ID, LockingModule, LockingModuleBuilder};
pub use options::{
    AcquireOptions, DEFAULT_EXECUTE_LEASE, DEFAULT_WAIT_TIMEOUT, ExecuteOptions, ExtendOptions,
    InspectOptions, ListOptions, MAX_DURATION, ReleaseOptions,
};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{DEFAULT_SCHEMA, ENV_POSTGRES_URL, PostgresConfig, PostgresProvider};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{DEFAULT_NAMESPACE, Deployment, ENV_URL, RedisConfig, RedisProvider};
#[cfg(feature = "redlock")]
#[cfg_attr(docsrs, doc(cfg(feature = "redlock")))]
pub use redlock::RedlockProvider;
/// What [`Held`] (the handle `execute` gives its job) says a lost lease with.
pub use tokio_util::sync::CancellationToken;

/// The pool [`RedisProvider::from_pool`] takes, at the version lockstep is
/// built with.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use deadpool_redis;

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
