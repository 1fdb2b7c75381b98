//! Distributed locks for workflows, backed by Redis: Medusa's Locking Module,
//! in Rust, without its sharp edges.
//!
//! # Layout
//!
//! - [`LockingModule`] (`module.rs`, `execute.rs`): the service. `execute`,
//!   `acquire`, `release`, `release_all` and `extend`, routed to a provider
//!   by id; `execute`'s job gets a [`Held`] (fencing tokens, loss signal).
//! - [`LockingProvider`] (`provider.rs`): the trait a backend implements,
//!   and its contract.
//! - [`InMemoryProvider`] (`memory.rs`): locks in this process; the default.
//! - [`RedisProvider`] (`redis/`): locks in Redis for many processes.
//!   `redis/config.rs` ([`RedisConfig`]), `redis/layout.rs` (key names, hash
//!   tags), `redis/connection.rs` (the shared connection, error kinds),
//!   `redis/acquire.rs` (attempts, the ways of waiting, undo guards),
//!   `redis/release.rs` (release with handoff, background undo),
//!   `redis/waiting.rs` (notifications and local waiter queues),
//!   `redis/sentinel.rs` (following a Sentinel master), `redis/cluster.rs`
//!   (requests split by hash slot on a Redis Cluster),
//!   `redis/scripts.rs` (the Lua scripts in `lua/` at the repository root).
//! - [`Lease`] (`lease.rs`): what an acquisition returns: owner and fencing
//!   tokens.
//! - [`Keys`] (`keys.rs`) and the options (`options.rs`): call inputs.
//! - [`workflow`] (`workflow/`): a small workflow engine with compensation,
//!   and Medusa's `acquire_lock_step` / `release_lock_step`.
//! - `RedlockProvider` (`redlock.rs`, feature `redlock`): one lock across a
//!   majority of independent Redis masters.
//! - [`LockError`], [`ConfigError`] (`error.rs`).
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
//! - `serde`: `Deserialize` for [`RedisConfig`].
//! - `tls`: `rediss://` URLs (rustls), with a private CA if needed.
//! - `sentinel`: find the master through Redis Sentinel and follow failovers
//!   ([`RedisConfig::from_sentinels`]).
//! - `redlock`: `RedlockProvider`, a quorum of independent masters.
//! - `cli`: the `lockstep` command line (and its dependencies).
//! - `testcontainers`: lets the test suite start Redis in Docker.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod execute;
mod keys;
mod lease;
mod memory;
mod module;
mod options;
mod provider;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redlock")]
mod redlock;
mod token;
pub mod workflow;

pub use error::{BackendError, BackendErrorKind, ConfigError, InvalidInput, LockError};
pub use execute::Held;
pub use keys::{Keys, MAX_KEY_LEN, MAX_KEYS, MAX_OWNER_LEN};
pub use lease::Lease;
pub use memory::InMemoryProvider;
pub use module::{IN_MEMORY_PROVIDER_ID, LockingModule, LockingModuleBuilder};
pub use options::{
    AcquireOptions, DEFAULT_EXECUTE_LEASE, DEFAULT_WAIT_TIMEOUT, ExecuteOptions, ExtendOptions,
    MAX_DURATION, ReleaseOptions,
};
pub use provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider, Wait};
#[cfg(feature = "redis")]
pub use redis::{DEFAULT_NAMESPACE, ENV_URL, RedisConfig, RedisProvider};
#[cfg(feature = "redlock")]
pub use redlock::RedlockProvider;
pub use tokio_util::sync::CancellationToken;

#[cfg(feature = "redis")]
pub use deadpool_redis;

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
