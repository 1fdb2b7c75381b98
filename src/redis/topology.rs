//! Where the provider's servers are: one server (found directly or through
//! Sentinel), or a Redis Cluster; and the one place where each operation
//! splits on it. The cluster side lives in `cluster/`, which only this file
//! and the `mod` line name.

use std::borrow::Cow;
use std::sync::RwLock;
use std::time::Duration;

use deadpool_redis::{Connection, Pool};
use redis::aio::MultiplexedConnection;

use super::RedisProvider;
#[cfg(feature = "cluster")]
use super::cluster;
use super::error::RawError;
use super::keyset::Keyset;
use super::scripts::acquire::{AcquireArgs, AcquireReply};
use super::scripts::release::{ReleaseArgs, Successor};
use crate::error::{ConfigError, LockError};
use crate::provider::Wait;

/// Where a [`RedisProvider`] finds its servers; see
/// [`RedisConfig::deployment`](crate::RedisConfig::deployment).
///
/// The variants beyond [`Server`](Deployment::Server) exist only with their
/// cargo feature, so a configuration a build cannot serve does not compile.
#[derive(Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
#[non_exhaustive]
pub enum Deployment {
    /// One server, at [`RedisConfig::url`](crate::RedisConfig::url) (the
    /// default).
    #[default]
    Server,
    /// A Redis Cluster (feature `cluster`), reached through these seed
    /// nodes (`redis://host:port`): locks are spread over its masters by
    /// hash slot, and `url` is not used.
    #[cfg(feature = "cluster")]
    Cluster {
        /// The seed nodes.
        nodes: Vec<String>,
    },
    /// A master found and followed through failovers by Redis Sentinel
    /// (feature `sentinel`). `url`, if set, only supplies the master's
    /// credentials and database.
    #[cfg(feature = "sentinel")]
    Sentinel {
        /// The sentinels' URLs (`redis://host:26379`).
        sentinels: Vec<String>,
        /// The name the sentinels know the master by (`sentinel monitor
        /// <name>`).
        master: String,
    },
}

impl Deployment {
    /// Checks the addresses are there.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if let Some((name, addresses)) = self.addresses()
            && addresses.is_empty()
        {
            return Err(ConfigError::InvalidSetting {
                name,
                reason: "no address given".into(),
            });
        }
        Ok(())
    }

    /// The addresses other than `url`, and what they are called.
    fn addresses(&self) -> Option<(&'static str, &[String])> {
        match self {
            Deployment::Server => None,
            #[cfg(feature = "cluster")]
            Deployment::Cluster { nodes } => Some(("cluster nodes", nodes)),
            #[cfg(feature = "sentinel")]
            Deployment::Sentinel { sentinels, .. } => Some(("sentinels", sentinels)),
        }
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // By hand, so that no password in a URL reaches a log.
        let Some((name, addresses)) = self.addresses() else {
            return f.write_str("Server");
        };
        let redacted: Vec<String> = addresses
            .iter()
            .map(|u| super::wire::redact_url(u))
            .collect();
        let mut d = f.debug_struct(name);
        d.field("addresses", &redacted);
        #[cfg(feature = "sentinel")]
        if let Deployment::Sentinel { master, .. } = self {
            d.field("master", master);
        }
        d.finish()
    }
}

/// Where the shared connection comes from.
pub(crate) enum Source {
    /// A deadpool pool for one server. Replaced when the master moves (a
    /// Sentinel failover).
    Pool(RwLock<Pool>),
    /// A cluster client.
    #[cfg(feature = "cluster")]
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Source {
    /// One server's pool.
    pub(crate) fn single(pool: Pool) -> Source {
        Source::Pool(RwLock::new(pool))
    }

    /// Where the current pool is kept (none on a cluster): replaced when a
    /// Sentinel master moves.
    pub(crate) fn pool_slot(&self) -> Option<&RwLock<Pool>> {
        match self {
            Source::Pool(p) => Some(p),
            #[cfg(feature = "cluster")]
            Source::Cluster(_) => None,
        }
    }

    /// The current pool (none on a cluster).
    pub(crate) fn pool(&self) -> Option<Pool> {
        self.pool_slot()
            .map(|p| p.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Whether connections go to a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self, Source::Pool(_))
    }

    /// A new shared connection, within `limit`.
    pub(crate) async fn connect(&self, limit: Duration) -> Result<Link, RawError> {
        match self {
            Source::Pool(p) => {
                let pool = p.read().unwrap_or_else(|e| e.into_inner()).clone();
                super::connection::checkout(&pool, limit)
                    .await
                    .map(|conn| Link::Single(Connection::take(conn)))
            }
            #[cfg(feature = "cluster")]
            Source::Cluster(client) => cluster::open(client, limit).await.map(Link::Cluster),
        }
    }
}

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

impl Link {
    /// Whether it is a connection to one server (not a cluster's).
    pub(crate) fn is_single(&self) -> bool {
        match self {
            Link::Single(_) => true,
            #[cfg(feature = "cluster")]
            Link::Cluster(_) => false,
        }
    }

    /// Loads every script, so that the first calls need no `NOSCRIPT` round,
    /// and, with `functions`, the function library. Returns whether to call
    /// the library's functions: not where the server or user refuses them
    /// (a failure of another kind, out of memory say, leaves the loading to
    /// the first call).
    pub(crate) async fn load_scripts(&mut self, functions: bool) -> redis::RedisResult<bool> {
        match self {
            Link::Single(c) => {
                let mut pipe = redis::pipe();
                for lua in super::scripts::all() {
                    pipe.load_script(lua.script()).ignore();
                }
                pipe.query_async::<()>(c).await?;
            }
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => cluster::load_scripts(c).await?,
        }
        Ok(functions
            && match super::scripts::load_library(self).await {
                Ok(()) => true,
                Err(e) => !super::scripts::refuses_functions(&e),
            })
    }

    /// Sends `cmd` where `routing` says (one server: to it).
    #[cfg(feature = "cluster")]
    pub(crate) async fn route(
        self,
        cmd: redis::Cmd,
        routing: redis::cluster_routing::RoutingInfo,
    ) -> redis::RedisResult<redis::Value> {
        match self {
            Link::Cluster(mut c) => c.route_command(cmd, routing).await,
            Link::Single(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// How the provider's operations are carried out.
pub(crate) enum Topology {
    /// Every script on one server.
    Single,
    /// Scripts split by hash slot over a cluster's masters.
    #[cfg(feature = "cluster")]
    Cluster(cluster::Cluster),
}

/// What a waiting call listens on while it waits: nothing extra on one
/// server (the process's subscription hears everything); on a cluster, its
/// keys' slots, left when this is dropped.
pub(crate) struct Listening {
    #[cfg(feature = "cluster")]
    _slots: Option<cluster::shards::Joined>,
}

/// The per-operation split.
impl RedisProvider {
    /// The keys of a request (`indexed` owners get their index: one per
    /// slot on a cluster, so a request over one slot carries that slot's).
    pub(crate) fn keyset(&self, keys: &[String], owner: Option<&str>) -> Keyset {
        let layout = &self.inner.layout;
        let locks: Vec<String> = keys.iter().map(|k| layout.lock_key(k)).collect();
        let index = match &self.inner.topology {
            Topology::Single => owner.map(|o| layout.owner_index(o)),
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => owner.and_then(|o| cluster::request_index(layout, &locks, o)),
        };
        let mut keyset = Keyset::new(layout, locks, index);
        keyset.indexed = owner.is_some();
        keyset
    }

    /// One run of `acquire.lua` for the whole request.
    pub(crate) async fn run_attempt(
        &self,
        keys: &Keyset,
        args: &AcquireArgs<'_>,
    ) -> Result<AcquireReply, LockError> {
        match &self.inner.topology {
            Topology::Single => self.attempt_single(keys, args).await,
            #[cfg(feature = "cluster")]
            // Boxed: the request over several slots is a large future, and
            // inline it would be allocated and copied with every
            // acquisition on one server too.
            Topology::Cluster(_) => Box::pin(self.attempt_grouped(keys, args)).await,
        }
    }

    /// Runs `release.lua` on already-mapped lock keys, handing the first to
    /// `successor` (a local waiter) if no other process is queued first.
    /// Returns per key whether it was released, and the successor's token
    /// if it got the lock.
    pub(crate) async fn run_release(
        &self,
        lock_keys: &[String],
        owner: &str,
        nonce: &str,
        successor: Option<Successor<'_>>,
    ) -> Result<(Vec<bool>, u64), LockError> {
        let layout = &self.inner.layout;
        let index = match &self.inner.topology {
            Topology::Single => (!owner.is_empty()).then(|| layout.owner_index(owner).permanent),
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => match lock_keys {
                // One slot: one script, which can hand the lock on.
                [lock_key] => (!owner.is_empty())
                    .then(|| cluster::slot_index(layout, owner, lock_key).permanent),
                _ => {
                    let released = Box::pin(self.release_grouped(lock_keys, owner, nonce)).await?;
                    return Ok((released, 0));
                }
            },
        };
        let prefix = self.channel_prefix_for(&lock_keys[0]);
        self.release_script(&ReleaseArgs {
            lock_keys,
            index: index.as_deref(),
            owner,
            nonce,
            claim_ms: self.inner.claim_ms,
            channel_prefix: &prefix,
            successor,
            pid: self.pid(),
        })
        .await
    }

    /// Sets the lease of `lock_keys` held by `owner`: `None` when all were
    /// extended, else the position of the first not held (nothing changed
    /// then, on one server; other slots' locks are extended on a cluster).
    pub(crate) async fn run_extend(
        &self,
        lock_keys: &[String],
        owner: Option<&str>,
        ttl_ms: u64,
        indexed: bool,
    ) -> Result<Option<usize>, LockError> {
        match &self.inner.topology {
            Topology::Single => self.extend_single(lock_keys, owner, ttl_ms, indexed).await,
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => self.extend_grouped(lock_keys, owner, ttl_ms, indexed).await,
        }
    }

    /// `inspect.lua` for already-mapped lock keys named `names`: one call
    /// on one server, one per slot on a cluster.
    pub(crate) async fn run_inspect(
        &self,
        lock_keys: &[String],
        names: &[String],
    ) -> Result<Vec<crate::inspect::LockInfo>, LockError> {
        match &self.inner.topology {
            Topology::Single => self.inspect_group(lock_keys, names).await,
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => self.inspect_by_slot(lock_keys, names).await,
        }
    }

    /// Every key matching `pattern` (string keys only), in pages: `SCAN`
    /// on one server, on every master of a cluster.
    pub(crate) async fn scan_lock_keys(
        &self,
        pattern: &str,
        count: usize,
    ) -> Result<Vec<Vec<String>>, LockError> {
        match &self.inner.topology {
            Topology::Single => self.scan_single(pattern, count).await,
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => self.scan_cluster(pattern, count).await,
        }
    }

    /// The permanent part of `owner`'s index that holds `lock_key`'s entry.
    pub(crate) fn permanent_index_of(&self, owner: &str, lock_key: &str) -> String {
        let layout = &self.inner.layout;
        match &self.inner.topology {
            Topology::Single => {
                let _ = lock_key; // one index per owner
                layout.owner_index(owner).permanent
            }
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => cluster::slot_index(layout, owner, lock_key).permanent,
        }
    }

    /// Releases every lock of `owner`, or of the namespace.
    pub(crate) async fn run_release_all(&self, owner: Option<&str>) -> Result<u64, LockError> {
        match &self.inner.topology {
            Topology::Single => self.release_all_single(owner).await,
            #[cfg(feature = "cluster")]
            Topology::Cluster(_) => self.release_all_cluster(owner).await,
        }
    }

    /// The channel prefix for scripts touching `lock_key`: per slot on a
    /// cluster with notifications (see `cluster/shards.rs`), the process's
    /// otherwise.
    pub(crate) fn channel_prefix_for(&self, lock_key: &str) -> Cow<'_, str> {
        match &self.inner.topology {
            Topology::Single => {
                let _ = lock_key; // one channel for every lock
                Cow::Borrowed(self.channel_prefix())
            }
            #[cfg(feature = "cluster")]
            Topology::Cluster(c) => c
                .channel_prefix(&self.inner.layout, lock_key)
                .map_or_else(|| Cow::Borrowed(self.channel_prefix()), Cow::Owned),
        }
    }

    /// Starts listening for the releases of `keys` before a waiting call's
    /// first attempt (on a cluster: subscribes to their slots, bounded by
    /// the call's deadline).
    pub(crate) async fn listen(&self, keys: &Keyset, wait: Wait) -> Listening {
        match &self.inner.topology {
            Topology::Single => {
                let _ = (keys, wait);
                Listening {
                    #[cfg(feature = "cluster")]
                    _slots: None,
                }
            }
            #[cfg(feature = "cluster")]
            Topology::Cluster(c) => Listening {
                // Boxed, as the cluster's attempt (see run_attempt).
                _slots: Box::pin(c.join(&self.inner.layout, keys.locks(), wait)).await,
            },
        }
    }
}
