//! Redis Cluster (feature `cluster`): three local masters sharing the 16,384
//! hash slots. The provider contract runs on it, then the cases a cluster
//! adds: requests across masters, a partial acquisition given back, the
//! owner's locks found on every master, and a slot moved under a held lock.

mod contract;
mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use contract::{Fixture, contract_suite};
use lockstep::{AcquireOptions, LockError, RedisConfig, RedisProvider, ReleaseOptions};
use redis::Commands;
use support::cluster::{Cluster, connect as sync_connection};
use support::{RedisServer, free_port};
use tokio::time::Instant;

/// The cluster this test binary's contract cases share.
fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start(3))
}

async fn provider(urls: &[String], namespace: &str) -> RedisProvider {
    let config = RedisConfig::from_cluster(urls.iter().cloned())
        .namespace(namespace)
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2));
    RedisProvider::connect(config)
        .await
        .expect("connect to the cluster")
}

async fn fixture() -> Fixture {
    let namespace = support::unique_namespace();
    let urls = shared().urls();
    let p = provider(&urls, &namespace).await;
    let peer_provider = provider(&urls, &namespace).await;
    let masters: Vec<String> = shared().masters.iter().map(|m| m.url()).collect();
    let residue = support::redis_residue(
        vec![p.clone(), peer_provider.clone()],
        masters,
        namespace.clone(),
    );
    Fixture {
        module: support::module_with(p.clone()),
        peer: support::module_with(peer_provider),
        provider: Arc::new(p),
        residue,
        fifo: true,
    }
}

contract_suite!(fixture);

/// Three keys whose lock keys hash to slots of three different masters.
fn keys_on_every_master(cluster: &Cluster, namespace: &str) -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; cluster.masters.len()];
    for i in 0.. {
        let key = format!("k{i}");
        let at = cluster.master_index_of(&format!("{namespace}{{{key}}}"));
        if found[at].is_none() {
            found[at] = Some(key);
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().map(Option::unwrap).collect()
}

/// The Redis key of lock `key` in `namespace` (the layout, spelt out here
/// so that the tests check it).
fn lock_key(namespace: &str, key: &str) -> String {
    format!("{namespace}{{{key}}}")
}

fn exists_on(node: &RedisServer, key: &str) -> bool {
    sync_connection(node).exists(key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_spans_masters_and_each_lock_lives_on_its_slots_master() {
    let cluster = shared();
    let ns = support::unique_namespace();
    let keys = keys_on_every_master(cluster, &ns);
    let p = provider(&cluster.urls(), &ns).await;
    // The function library went to every master.
    assert!(p.runs_functions());
    let m = support::module_with(p);
    let lease = m
        .acquire(
            keys.clone(),
            AcquireOptions::new()
                .owner_id("run-1")
                .expire(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(lease.fencing_tokens().count(), 3);
    for key in &keys {
        let lock = lock_key(&ns, key);
        assert!(exists_on(cluster.master_of(&lock), &lock), "{lock}");
    }
    // The owner's index is split by slot: one part beside each lock.
    for node in &cluster.masters {
        let parts: Vec<String> = sync_connection(node)
            .keys(format!("{ns}{{*}}:o:run-1"))
            .unwrap();
        assert_eq!(parts.len(), 1, "{parts:?}");
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut sync_connection(node))
            .unwrap();
        assert!(stats.contains("cmdstat_fcall:"), "no FCALL on {node:?}");
    }
    assert!(lease.release().await.unwrap());
    for key in &keys {
        let lock = lock_key(&ns, key);
        assert!(!exists_on(cluster.master_of(&lock), &lock), "{lock}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_one_master_s_lock_held_leaves_nothing_on_the_others() {
    let cluster = shared();
    let ns = support::unique_namespace();
    let keys = keys_on_every_master(cluster, &ns);
    let m = support::module_with(provider(&cluster.urls(), &ns).await);
    let other = support::module_with(provider(&cluster.urls(), &ns).await);
    // The last slot in order is held: the first two were taken, then given back.
    let mut by_slot = keys.clone();
    by_slot.sort_by_key(|k| cluster.slot_of(&lock_key(&ns, k)));
    let held = other
        .acquire(
            by_slot[2].as_str(),
            AcquireOptions::new()
                .owner_id("b")
                .expire(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let err = m
        .acquire(
            keys.clone(),
            AcquireOptions::new()
                .owner_id("a")
                .expire(Duration::from_secs(10))
                .timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LockError::TimedOut { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    for key in &by_slot[..2] {
        let lock = lock_key(&ns, key);
        assert!(
            !exists_on(cluster.master_of(&lock), &lock),
            "{lock} left held"
        );
    }
    // Once the lock is free, the whole request goes through.
    let waiter = tokio::spawn({
        let keys = keys.clone();
        async move {
            m.acquire(
                keys,
                AcquireOptions::new()
                    .owner_id("a")
                    .expire(Duration::from_secs(10))
                    .timeout(Duration::from_secs(5)),
            )
            .await
        }
    });
    until_queued(cluster, &[lock_key(&ns, &by_slot[2])]).await;
    assert!(held.release().await.unwrap());
    let lease = waiter.await.unwrap().expect("all three after the release");
    assert_eq!(lease.fencing_tokens().count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_all_finds_an_owner_s_locks_on_every_master() {
    let cluster = shared();
    let ns = support::unique_namespace();
    let keys = keys_on_every_master(cluster, &ns);
    let m = support::module_with(provider(&cluster.urls(), &ns).await);
    for key in &keys {
        let _ = m
            .acquire(key.as_str(), AcquireOptions::new().owner_id("run-9"))
            .await
            .unwrap();
    }
    let other = m
        .acquire("another", AcquireOptions::new().owner_id("run-10"))
        .await
        .unwrap();
    assert_eq!(
        m.release_all(ReleaseOptions::new().owner_id("run-9"))
            .await
            .unwrap(),
        3
    );
    for key in &keys {
        let lock = lock_key(&ns, key);
        assert!(!exists_on(cluster.master_of(&lock), &lock), "{lock}");
        assert!(
            sync_connection(cluster.master_of(&lock))
                .keys::<_, Vec<String>>(format!("{ns}{{*}}:o:run-9"))
                .unwrap()
                .is_empty()
        );
    }
    assert!(
        m.acquire("another", AcquireOptions::new().owner_id("run-11"))
            .await
            .is_err(),
        "another owner's lock stays"
    );
    // The namespace form reaches every master too.
    for key in &keys {
        let _ = m
            .acquire(key.as_str(), AcquireOptions::new().owner_id("run-12"))
            .await
            .unwrap();
    }
    assert_eq!(m.release_all(ReleaseOptions::new()).await.unwrap(), 4);
    drop(other);
}

/// Moves `slot` from `from` to `to` with its keys, as `redis-cli --cluster
/// reshard` does, and tells every node.
fn move_slot(cluster: &Cluster, slot: u16, from: &RedisServer, to: &RedisServer) {
    let migration = Migration::begin(slot, from, to);
    migration.migrate(None);
    migration.finish(cluster);
}

/// Waits until some process is queued for one of `locks` (Redis key names),
/// wherever their slots are now.
async fn until_queued(cluster: &Cluster, locks: &[String]) {
    let mut c = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_connection()
        .unwrap();
    support::eventually(Duration::from_secs(5), "a waiter queued", || {
        let queued = locks
            .iter()
            .any(|l| c.llen::<_, u64>(format!("{l}:q")).unwrap_or(0) > 0);
        async move { queued }
    })
    .await;
}

/// The shard channels `node` has subscribers for, under `namespace`.
fn shard_channels(node: &RedisServer, namespace: &str) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("SHARDCHANNELS")
        .arg(format!("{namespace}*"))
        .query(&mut sync_connection(node))
        .unwrap()
}

/// A provider whose waiters only a notification can wake in time: its
/// fallback period is 60 s (and the tests' locks have no lease).
async fn only_notified(urls: &[String], namespace: &str) -> RedisProvider {
    let config = RedisConfig::from_cluster(urls.iter().cloned())
        .namespace(namespace)
        .wait_fallback(Duration::from_secs(60));
    RedisProvider::connect(config).await.unwrap()
}

/// Releases `held` and expects `waiting` to get the lock within 5 s: woken
/// by the release, since the fallback is 60 s.
async fn release_wakes(
    held: lockstep::Lease,
    waiting: tokio::task::JoinHandle<Result<lockstep::Lease, LockError>>,
) {
    let started = Instant::now();
    assert!(held.release().await.unwrap());
    let lease = waiting.await.unwrap().expect("woken by the release");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?} (the fallback is 60 s)",
        started.elapsed()
    );
    assert!(lease.release().await.unwrap());
}

/// An acquisition of `key` by owner "w" that waits up to `timeout`, in a
/// task of its own.
fn spawn_wait(
    module: &lockstep::LockingModule,
    key: &str,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<lockstep::Lease, LockError>> {
    let (module, key) = (module.clone(), key.to_owned());
    tokio::spawn(async move {
        module
            .acquire(
                key.as_str(),
                AcquireOptions::new().owner_id("w").timeout(timeout),
            )
            .await
    })
}

/// A slot being moved by hand, step by step, as `redis-cli --cluster
/// reshard` does.
struct Migration<'a> {
    slot: u16,
    from: &'a RedisServer,
    to: &'a RedisServer,
}

impl<'a> Migration<'a> {
    /// Marks the slot importing on `to`, migrating on `from`.
    fn begin(slot: u16, from: &'a RedisServer, to: &'a RedisServer) -> Self {
        let to_id = support::cluster::node_id(to);
        let from_id = support::cluster::node_id(from);
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .exec(&mut sync_connection(to))
            .unwrap();
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .exec(&mut sync_connection(from))
            .unwrap();
        Migration { slot, from, to }
    }

    /// Moves `keys` (all the slot's keys still on `from` if `None`).
    fn migrate(&self, keys: Option<&[String]>) {
        let mut src = sync_connection(self.from);
        let keys: Vec<String> = match keys {
            Some(k) => k.to_vec(),
            None => redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(self.slot)
                .arg(1000)
                .query(&mut src)
                .unwrap(),
        };
        if keys.is_empty() {
            return;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(self.to.port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .exec(&mut src)
            .unwrap();
    }

    /// Gives the slot to `to` on every master (`to` and `from` first, and
    /// again with the others: a repeated SETSLOT NODE is what a careless
    /// operator's script does, and drops sharded subscriptions again).
    fn finish(&self, cluster: &Cluster) {
        let to_id = support::cluster::node_id(self.to);
        for node in [self.to, self.from].into_iter().chain(&cluster.masters) {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(self.slot)
                .arg("NODE")
                .arg(&to_id)
                .exec(&mut sync_connection(node))
                .unwrap();
        }
    }
}

/// Mid-migration: the lock key has moved, its fencing counter not yet.
/// Scripts then meet ASK or TRYAGAIN; a waiting acquisition treats them as
/// passing and tries again until the slot has moved, then gets the lock
/// once its holder (whose release follows the slot) lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_a_slot_migration_wait_it_out() {
    let cluster = Cluster::start(3);
    let ns = "mid:";
    let holder = support::module_with(provider(&cluster.urls(), ns).await);
    let waiter_provider = provider(&cluster.urls(), ns).await;
    let waiter = support::module_with(waiter_provider.clone());
    let lease = holder
        .acquire("order_1", AcquireOptions::new().owner_id("h"))
        .await
        .unwrap();
    let first_token = lease.fencing_token();
    let lock = format!("{ns}{{order_1}}");
    let slot = cluster.slot_of(&lock);
    let from = cluster.master_of(&lock);
    let to = cluster
        .masters
        .iter()
        .find(|n| n.port != from.port)
        .unwrap();
    let migration = Migration::begin(slot, from, to);
    migration.migrate(Some(std::slice::from_ref(&lock)));

    // One attempt meets the half-moved slot: a passing error, or (if the
    // client followed an ASK to where the lock is) the lock held.
    let once = waiter
        .acquire("order_1", AcquireOptions::new().owner_id("w"))
        .await
        .unwrap_err();
    assert!(once.is_transient() || once.is_contended(), "{once:?}");
    // A waiting one rides it out.
    let sent = waiter_provider.round_trips();
    let waiting = spawn_wait(&waiter, "order_1", Duration::from_secs(20));
    support::eventually(
        Duration::from_secs(5),
        "two attempts in the half-moved slot",
        || {
            let tried = waiter_provider.round_trips() >= sent + 2;
            async move { tried }
        },
    )
    .await;
    migration.migrate(None);
    migration.finish(&cluster);
    assert!(lease.release().await.unwrap(), "released on the new master");
    let lease = waiting
        .await
        .unwrap()
        .expect("the lock after the migration");
    assert!(lease.fencing_token() > first_token);
    assert!(lease.release().await.unwrap());
}

/// A slot moves to another master while its lock is held: the provider
/// follows the MOVED redirection, the lock is still held (and owned), and
/// the fencing counter moved with it, so tokens keep growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_survives_its_slot_moving_to_another_master() {
    let cluster = Cluster::start(3);
    let ns = "mv:";
    let m = support::module_with(provider(&cluster.urls(), ns).await);
    let peer = support::module_with(provider(&cluster.urls(), ns).await);
    let opts = |o: &str| {
        AcquireOptions::new()
            .owner_id(o)
            .expire(Duration::from_secs(30))
    };
    let lease = m.acquire("order_1", opts("a")).await.unwrap();
    let first_token = lease.fencing_token();
    let lock = format!("{ns}{{order_1}}");
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&lock)
        .query(&mut sync_connection(&cluster.masters[0]))
        .unwrap();
    let from = cluster.master_of(&lock);
    let to = cluster
        .masters
        .iter()
        .find(|n| n.port != from.port)
        .unwrap();
    move_slot(&cluster, slot, from, to);
    assert!(exists_on(to, &lock));
    let left: u64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query(&mut sync_connection(from))
        .unwrap();
    assert_eq!(left, 0);

    // Still held, by its owner only.
    let err = peer
        .acquire("order_1", opts("b").timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, LockError::Contended { .. }), "{err}");
    let mut lease = lease;
    lease.extend(Duration::from_secs(30)).await.unwrap();
    assert!(lease.release().await.unwrap());

    let next = peer.acquire("order_1", opts("b")).await.unwrap();
    assert!(next.fencing_token() > first_token);
    assert!(exists_on(to, &lock));
    assert!(next.release().await.unwrap());
}

/// `lua/release_all.lua` in slots mode, run by hand on one master: an index
/// of a slot it serves is released, a slot it does not serve is returned
/// as skipped (the provider then asks the slot's new master).
#[test]
fn the_slots_mode_script_releases_local_indexes_and_returns_foreign_slots() {
    const SOURCE: &str = concat!(
        "#!lua flags=allow-cross-slot-keys\n",
        include_str!("../lua/prelude.lua"),
        "\n",
        include_str!("../lua/release_all.lua")
    );
    let cluster = shared();
    let ns = support::unique_namespace();
    // Tags, as the provider's layout makes them: any string hashing to the
    // slot will do for the script.
    let slot_of = |tag: &str| -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(tag)
            .query(&mut sync_connection(&cluster.masters[0]))
            .unwrap()
    };
    let (local, foreign) = ("a", "b"); // slots 15495 and 3300
    let node = cluster.master_of(local);
    assert_ne!(node.port, cluster.master_of(foreign).port);
    let mut c = sync_connection(node);
    let lock = lock_key(&ns, local);
    let index = format!("{}:o:run-1", lock_key(&ns, local));
    // A lock held by run-1 (owner + 12-byte nonce), in its index.
    let _: () = c.set(&lock, "run-1nonce-12byte").unwrap();
    let _: () = c.zadd(&index, &lock, "+inf").unwrap();
    let (released, skipped): (u64, Vec<String>) = redis::cmd("EVAL")
        .arg(SOURCE)
        .arg(0)
        .arg("slots")
        .arg("run-1")
        .arg(1000)
        .arg("")
        .arg(format!("{ns}{{"))
        .arg("}:o:run-1")
        .arg(local)
        .arg(foreign)
        .query(&mut c)
        .unwrap();
    assert_eq!((released, skipped), (1, vec![foreign.to_owned()]));
    assert!(!exists_on(node, &lock) && !exists_on(node, &index));
    assert!(slot_of(local) != slot_of(foreign));
}

/// Cluster settings that cannot work are typed errors, within the connect
/// timeout, with no password in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cluster_settings_are_typed_errors() {
    use lockstep::ConfigError;
    let quick = |c: RedisConfig| c.connect_timeout(Duration::from_millis(500));

    // Nobody listening.
    let port = free_port();
    let started = Instant::now();
    let e = RedisProvider::connect(quick(RedisConfig::from_cluster([format!(
        "redis://:s3cret@127.0.0.1:{port}"
    )])))
    .await
    .unwrap_err();
    assert!(matches!(e, ConfigError::Unreachable { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!format!("{e} {e:?}").contains("s3cret"), "{e:?}");

    // A server that is not part of a cluster.
    let plain = RedisServer::start(&[]);
    let e = RedisProvider::connect(quick(RedisConfig::from_cluster([plain.url()])))
        .await
        .unwrap_err();
    assert!(matches!(e, ConfigError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("cluster support disabled"), "{e}");

    // No seed node, or one that is not a URL. (Seed nodes together with
    // sentinels, a runtime error before, no longer type-check: a
    // `Deployment` is one or the other.)
    for config in [
        RedisConfig::from_cluster(Vec::<String>::new()),
        RedisConfig::from_cluster(["not a url"]),
    ] {
        let e = RedisProvider::connect(quick(config)).await.unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::InvalidSetting { .. } | ConfigError::InvalidUrl { .. }
            ),
            "{e:?}"
        );
    }
}

/// Multi-key requests across masters under contention: 8 tasks over two
/// providers (two "processes") each take 3 of 6 keys, spread over the three
/// masters, in shuffled orders, 25 times. Mutual exclusion holds at every
/// moment (an in-process count per key never exceeds one), every request
/// is served (no deadlock: nothing is held while waiting), and afterwards
/// no lock, queue or index is left on any master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_requests_across_masters_under_contention() {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    let cluster = shared();
    let ns = support::unique_namespace();
    let mut keys = keys_on_every_master(cluster, &ns);
    keys.extend(
        keys_on_every_master(cluster, &ns)
            .into_iter()
            .map(|k| format!("{k}-b")),
    );
    let keys: Arc<Vec<String>> = Arc::new(keys);
    let holders: Arc<Vec<AtomicI64>> =
        Arc::new((0..keys.len()).map(|_| AtomicI64::new(0)).collect());
    let violations = Arc::new(AtomicU64::new(0));
    let modules = [
        support::module_with(provider(&cluster.urls(), &ns).await),
        support::module_with(provider(&cluster.urls(), &ns).await),
    ];
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let m = modules[t as usize % 2].clone();
        let (keys, holders, violations) = (keys.clone(), holders.clone(), violations.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for round in 0..25 {
                let mut picked: Vec<usize> = (0..keys.len()).collect();
                for i in (1..picked.len()).rev() {
                    picked.swap(i, next() as usize % (i + 1));
                }
                picked.truncate(3);
                let request: Vec<String> = picked.iter().map(|&i| keys[i].clone()).collect();
                let lease = m
                    .acquire(
                        request,
                        AcquireOptions::new()
                            .owner_id(format!("t{t}-{round}"))
                            .expire(Duration::from_secs(10))
                            .timeout(Duration::from_secs(30)),
                    )
                    .await
                    .expect("every request is served");
                for &i in &picked {
                    if holders[i].fetch_add(1, Ordering::SeqCst) != 0 {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                for &i in &picked {
                    holders[i].fetch_sub(1, Ordering::SeqCst);
                }
                assert!(lease.release().await.unwrap());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    for node in &cluster.masters {
        let left = support::namespace_keys(&[node.url()], &ns).await;
        // Only the fencing counters and expiring owner indexes stay.
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Release notifications by sharded pub/sub: with a 60 s fallback and
/// locks without leases, only a notification can wake a waiter in time.
/// Single-key waiters (handed the lock) in every master's slots, and a
/// multi-key waiter across all three (woken, then retrying).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_wake_waiters_in_every_slot_by_sharded_pub_sub() {
    let cluster = shared();
    let ns = support::unique_namespace();
    let keys = keys_on_every_master(cluster, &ns);
    let urls = cluster.urls();
    let (holder_p, waiter_p) = (
        only_notified(&urls, &ns).await,
        only_notified(&urls, &ns).await,
    );
    assert!(waiter_p.is_notified());
    let (holder, waiter) = (
        support::module_with(holder_p),
        support::module_with(waiter_p.clone()),
    );
    let wait = |o: &str| {
        AcquireOptions::new()
            .owner_id(o)
            .timeout(Duration::from_secs(20))
    };
    for key in &keys {
        let held = holder
            .acquire(key.as_str(), AcquireOptions::new().owner_id("h"))
            .await
            .unwrap();
        let waiting = spawn_wait(&waiter, key, Duration::from_secs(20));
        until_queued(cluster, &[lock_key(&ns, key)]).await;
        release_wakes(held, waiting).await;
    }
    // A multi-key waiter across the three masters.
    let held: Vec<_> = {
        let mut v = Vec::new();
        for key in &keys {
            v.push(
                holder
                    .acquire(key.as_str(), AcquireOptions::new().owner_id("h"))
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let started = Instant::now();
    let waiting = tokio::spawn({
        let (waiter, keys, options) = (waiter.clone(), keys.clone(), wait("m"));
        async move { waiter.acquire(keys, options).await }
    });
    let locks: Vec<String> = keys.iter().map(|k| lock_key(&ns, k)).collect();
    until_queued(cluster, &locks).await;
    for lease in held {
        assert!(lease.release().await.unwrap());
    }
    let lease = waiting.await.unwrap().expect("woken by the releases");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lease.fencing_tokens().count(), 3);
    assert!(lease.release().await.unwrap());
}

/// A slot moves while a process waits in it: its old master drops the
/// subscription (an unsolicited SUNSUBSCRIBE), the provider subscribes
/// again on the new master, and the release there still wakes the waiter
/// (the fallback is 60 s and the lock has no lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_follows_its_slot_to_another_master() {
    let cluster = Cluster::start(3);
    let ns = "mvw:";
    let urls = cluster.urls();
    let connect = || async { support::module_with(only_notified(&urls, ns).await) };
    let (holder, waiter) = (connect().await, connect().await);
    let held = holder
        .acquire("order_1", AcquireOptions::new().owner_id("h"))
        .await
        .unwrap();
    let waiting = spawn_wait(&waiter, "order_1", Duration::from_secs(30));
    let lock = format!("{ns}{{order_1}}");
    // The waiter is queued (and so subscribed) before the slot moves.
    until_queued(&cluster, std::slice::from_ref(&lock)).await;
    let slot = cluster.slot_of(&lock);
    let from = cluster.master_of(&lock);
    let to = cluster
        .masters
        .iter()
        .find(|n| n.port != from.port)
        .unwrap();
    move_slot(&cluster, slot, from, to);
    // The waiter listens on the new master again; then the release there.
    support::eventually(
        Duration::from_secs(5),
        "subscribed on the new master",
        || {
            let listening = !shard_channels(to, ns).is_empty();
            async move { listening }
        },
    )
    .await;
    release_wakes(held, waiting).await;
}

/// A request over several slots that fails leaves the leases of locks its
/// owner already held as they were (the give-back by nonce cannot touch
/// re-entered locks, so their lease is only renewed once every slot said
/// yes); one that succeeds renews them, as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_over_several_slots_leaves_re_entered_leases_alone() {
    let cluster = shared();
    let ns = support::unique_namespace();
    let mut keys = keys_on_every_master(cluster, &ns);
    keys.sort_by_key(|k| cluster.slot_of(&lock_key(&ns, k)));
    let (first, middle, last) = (&keys[0], &keys[1], &keys[2]);
    let m = support::module_with(provider(&cluster.urls(), &ns).await);
    let other = support::module_with(provider(&cluster.urls(), &ns).await);
    let pttl = |key: &str| {
        let lock = lock_key(&ns, key);
        redis::cmd("PTTL")
            .arg(&lock)
            .query::<i64>(&mut sync_connection(cluster.master_of(&lock)))
            .unwrap()
    };
    let _held = m
        .acquire(
            first.as_str(),
            AcquireOptions::new()
                .owner_id("a")
                .expire(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let _theirs = other
        .acquire(last.as_str(), AcquireOptions::new().owner_id("b"))
        .await
        .unwrap();
    // The first slot re-enters `first`, the last finds `last` held.
    let err = m
        .acquire(
            vec![first.clone(), last.clone()],
            AcquireOptions::new()
                .owner_id("a")
                .expire(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(err.is_contended(), "{err:?}");
    assert!(
        pttl(first) > 50_000,
        "the 60 s lease is untouched: {}",
        pttl(first)
    );
    // A request that goes through renews it, as one script would.
    let lease = m
        .acquire(
            vec![first.clone(), middle.clone()],
            AcquireOptions::new()
                .owner_id("a")
                .expire(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert!(lease.was_reentered(first) && !lease.was_reentered(middle));
    assert!((1..=5_000).contains(&pttl(first)), "{}", pttl(first));
    assert!((1..=5_000).contains(&pttl(middle)), "{}", pttl(middle));
}

/// A slot moves while the process is subscribed to it but nobody waits in
/// it (within the 10 s before an idle slot is unsubscribed): the next
/// waiter there subscribes again instead of trusting the dropped
/// subscription, so a release still wakes it (60 s fallback, no lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_moved_while_idle_is_subscribed_again() {
    let cluster = Cluster::start(3);
    let ns = "idle:";
    let urls = cluster.urls();
    let connect = || async { support::module_with(only_notified(&urls, ns).await) };
    let (holder, waiter) = (connect().await, connect().await);
    let hold = || async {
        holder
            .acquire("order_1", AcquireOptions::new().owner_id("h"))
            .await
            .unwrap()
    };
    // A first wait subscribes the waiter to the slot.
    let held = hold().await;
    let lock = format!("{ns}{{order_1}}");
    let waiting = spawn_wait(&waiter, "order_1", Duration::from_secs(30));
    until_queued(&cluster, std::slice::from_ref(&lock)).await;
    assert!(held.release().await.unwrap());
    assert!(waiting.await.unwrap().unwrap().release().await.unwrap());
    // Nobody waits now; the slot moves.
    let from = cluster.master_of(&lock);
    let to = cluster
        .masters
        .iter()
        .find(|n| n.port != from.port)
        .unwrap();
    move_slot(&cluster, cluster.slot_of(&lock), from, to);
    // The old master has dropped the subscription (and told the waiter's
    // process so); nothing listens on the new one yet.
    support::eventually(Duration::from_secs(5), "the subscription dropped", || {
        let dropped = shard_channels(from, ns).is_empty();
        async move { dropped }
    })
    .await;
    assert!(shard_channels(to, ns).is_empty());
    // A second wait in the same slot.
    let held = hold().await;
    let waiting = spawn_wait(&waiter, "order_1", Duration::from_secs(30));
    until_queued(&cluster, std::slice::from_ref(&lock)).await;
    release_wakes(held, waiting).await;
}

/// `connect` dropped at every poll, on a cluster of its own: no connection
/// to any node stays open. (The sharded subscriptions start after
/// `connect`'s last await: what a drop can leave is the cluster
/// connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connect_leaves_no_connection_behind() {
    let cluster = Cluster::start(3);
    let urls = cluster.urls();
    support::dropped_connects_leave_no_client(&urls, || {
        RedisProvider::connect(RedisConfig::from_cluster(urls.iter().cloned()))
    })
    .await;
}
