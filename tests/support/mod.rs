//! Test support: the servers come from the test kit (`testkit/`); this
//! module adds the helpers that know lockstep.
//!
//! Where Redis comes from, in order (see `lockstep_testkit::shared_url`):
//! 1. `REDIS_URL`, when set: a server you run. Tests only touch keys under
//!    their own random namespaces and never flush it.
//! 2. A `redis-server` binary (`LOCKSTEP_REDIS_SERVER_BIN`, else `PATH`):
//!    spawned on a free loopback port, one per test binary, plus private
//!    servers for tests that restart, flush or reconfigure theirs.
//! 3. Docker, with the test kit's `testcontainers` feature.
//!
//! Otherwise the tests fail with instructions. The machine's own Redis on
//! 6379 is never used unless `REDIS_URL` points at it.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::sync::atomic::{AtomicU32, Ordering};

pub use lockstep_testkit::*;

use lockstep::{LockingModule, RedisConfig, RedisProvider};

/// A namespace no other test uses, so tests can share one server.
pub fn unique_namespace() -> String {
    format!("t{}:", &uuid_like()[..12])
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

/// A Redis provider on the shared server, in a fresh namespace.
pub async fn redis_provider() -> RedisProvider {
    redis_provider_in(&unique_namespace()).await
}

/// A Redis provider on the shared server, in `namespace`.
pub async fn redis_provider_in(namespace: &str) -> RedisProvider {
    let config = RedisConfig::from_url(shared_url()).namespace(namespace);
    RedisProvider::connect(config)
        .await
        .expect("connect to the test Redis")
}

/// A module whose default provider is Redis (registered as "locking-redis").
pub fn module_with(provider: RedisProvider) -> LockingModule {
    LockingModule::builder()
        .default_provider("locking-redis", provider)
        .build()
        .expect("valid module")
}

/// The number of clients connected to the server behind `admin`
/// (`INFO clients`), `admin` included.
async fn clients(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(admin)
        .await
        .expect("INFO clients");
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("connected_clients in INFO")
}

/// Waits until each server behind `admins` has no client but that one.
async fn only_admins(admins: &[redis::aio::MultiplexedConnection], what: &str) {
    eventually(std::time::Duration::from_secs(5), what, || {
        let admins = admins.to_vec();
        async move {
            for mut admin in admins {
                if clients(&mut admin).await != 1 {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

/// Drops `connect()` at every poll and at moments spread over its run
/// ([`drop_everywhere`]), shutting down the provider of each call that
/// completes; after each, waits until every server of `watched` (servers
/// of the test's own) has no client but this helper's connection to it: a
/// dropped connect leaves no connection behind, nor a task that would hold
/// one. (A task leaked by one drop connects before the next one is done.)
pub async fn dropped_connects_leave_no_client<P, F, Fut>(watched: &[String], connect: F)
where
    P: lockstep::provider::LockingProvider,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<P, lockstep::ConfigError>>,
{
    let mut admins = Vec::new();
    for url in watched {
        admins.push(raw_connection(url).await);
    }
    // The test kit's readiness probe may still be closing.
    only_admins(
        &admins,
        "only the helper's connection before the first connect",
    )
    .await;
    let admins = &admins;
    drop_everywhere(
        "connect",
        connect,
        |provider| async move { provider.expect("connect").shutdown().await },
        |when| async move { only_admins(admins, &format!("no client left {when}")).await },
    )
    .await;
}

/// Whether `key` is the expiring part of an owner index (`<ns>{owner}:o`,
/// or `<ns>{tag}:o:<owner>` on a cluster): a release leaves its entries
/// there, and the key expires with the owner's longest lease.
pub fn is_expiring_index(key: &str) -> bool {
    key.ends_with(":o") || key.contains("}:o:")
}

/// The keys of namespace `ns` on the servers at `urls` but the ones it keeps
/// on purpose, sorted: what a namespace holds besides its fencing counters
/// (`<ns>{T}:f`) and expiring owner indexes that do expire (see
/// [`is_expiring_index`]; one without an expiry is listed), for leak checks.
pub async fn namespace_keys(urls: &[String], ns: &str) -> Vec<String> {
    use redis::AsyncCommands;
    let mut keys = Vec::new();
    for url in urls {
        let mut c = raw_connection(url).await;
        let mut found = Vec::new();
        {
            let mut iter: redis::AsyncIter<String> = c.scan_match(format!("{ns}*")).await.unwrap();
            while let Some(key) = iter.next_item().await {
                found.push(key.unwrap());
            }
        }
        for key in found {
            if key.ends_with(":f") {
                continue;
            }
            if is_expiring_index(&key) && c.pttl::<_, i64>(&key).await.unwrap() != -1 {
                continue;
            }
            keys.push(key);
        }
    }
    keys.sort();
    keys
}

/// The future of [`Residue::stored`].
pub type StoredKeys =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send + 'static>>;

/// How to see what a provider (both modules of a contract fixture) keeps
/// besides the locks callers hold, for leak checks.
#[derive(Clone)]
pub struct Residue {
    /// Entries of its in-process registries (keys with waiters, withdraws
    /// under way).
    pub local: std::sync::Arc<dyn Fn() -> usize + Send + Sync>,
    /// What the backend stores besides fencing counters: keys of the
    /// namespace (Redis), held locks (in-memory).
    pub stored: std::sync::Arc<dyn Fn() -> StoredKeys + Send + Sync>,
}

/// The residue of Redis `providers` whose namespace `ns` is on the servers
/// at `urls`.
pub fn redis_residue(providers: Vec<RedisProvider>, urls: Vec<String>, ns: String) -> Residue {
    Residue {
        local: std::sync::Arc::new(move || {
            providers.iter().map(RedisProvider::waiting_locks).sum()
        }),
        stored: std::sync::Arc::new(move || {
            let (urls, ns) = (urls.clone(), ns.clone());
            Box::pin(async move { namespace_keys(&urls, &ns).await })
        }),
    }
}
