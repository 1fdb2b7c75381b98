//! Replica acknowledgement (`RedisConfig::wait_for_replicas`), and the lock
//! loss it prevents: a master that fails over before its replica received
//! the lock. The replica follows its master through a proxy, so the test
//! can cut replication precisely.

mod support;

use std::time::Duration;

use lockstep::{AcquireOptions, BackendErrorKind, LockError, RedisConfig, RedisProvider};
use redis::AsyncCommands;
use support::{Proxy, RedisServer, module_with, raw_connection};
use tokio::time::Instant;

const NS: &str = "repl:";

/// A master, and a replica following it through a proxy, in sync.
async fn pair() -> (RedisServer, Proxy, RedisServer) {
    let master = RedisServer::start(&[
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ]);
    let proxy = Proxy::start(master.port);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &proxy.port.to_string()]);
    support::wait_until_in_sync(&replica.url()).await;
    (master, proxy, replica)
}

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new()
        .owner_id(o)
        .expire(Duration::from_secs(60))
}

/// With `wait_for_replicas(1, ..)`, an acquisition is reported only once
/// the replica has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquisitions_wait_for_their_replica() {
    let (master, _proxy, replica) = pair().await;
    let config = RedisConfig::from_url(master.url())
        .namespace(NS)
        .wait_for_replicas(1, Duration::from_secs(2));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    let mut r = raw_connection(&replica.url()).await;
    for i in 0..20 {
        let key = format!("k{i}");
        let lease = m.acquire(key.as_str(), owner("a")).await.unwrap();
        // No waiting here: the acquisition returned after the replica acknowledged it.
        let on_replica: Option<Vec<u8>> = r.get(format!("{NS}{{{key}}}")).await.unwrap();
        assert!(
            on_replica.is_some_and(|v| v.starts_with(b"a")),
            "{key} is on the replica"
        );
        assert!(lease.release().await.unwrap());
    }
}

/// An acquisition the replica does not acknowledge in time fails, typed,
/// and leaves nothing held on the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreplicated_acquisition_fails_and_is_released() {
    let (master, proxy, _replica) = pair().await;
    let config = RedisConfig::from_url(master.url())
        .namespace(NS)
        .wait_for_replicas(1, Duration::from_millis(300));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    proxy.partition(true);
    let started = Instant::now();
    let e = m.acquire("k", owner("a")).await.unwrap_err();
    assert!(
        matches!(&e, LockError::Backend(b) if b.kind() == BackendErrorKind::NotReplicated),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let mut c = raw_connection(&master.url()).await;
    assert!(
        !c.exists::<_, bool>(format!("{NS}{{k}}")).await.unwrap(),
        "released on the master"
    );
    proxy.partition(false);
}

/// The loss, reproduced: the master takes a lock that never reaches its
/// replica, dies, and the promoted replica lets a second holder in. The
/// fencing tokens still order the two holders (the newer one is higher, by
/// the tokens' time floor), so a store that checks them refuses the first
/// holder's late writes. With `wait_for_replicas`, the first acquisition
/// would have failed instead of being reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_before_replication_loses_the_lock_and_tokens_still_order_the_holders() {
    let (mut master, proxy, replica) = pair().await;
    let plain = RedisConfig::from_url(master.url()).namespace(NS);
    let a = module_with(RedisProvider::connect(plain).await.unwrap());
    // With the option on, the same acquisition is refused while
    // replication is cut.
    let careful = RedisConfig::from_url(master.url())
        .namespace(NS)
        .wait_for_replicas(1, Duration::from_millis(300));
    let careful = module_with(RedisProvider::connect(careful).await.unwrap());

    proxy.partition(true);
    let refused = careful
        .acquire("other", owner("careful"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, LockError::Backend(b) if b.kind() == BackendErrorKind::NotReplicated)
    );
    let first = a.acquire("k", owner("first")).await.unwrap();
    let first_token = first.fencing_token();
    // The master dies before replicating; the replica is promoted.
    master.signal("KILL");
    let mut r = raw_connection(&replica.url()).await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut r)
        .await
        .unwrap();
    let b = module_with(
        RedisProvider::connect(RedisConfig::from_url(replica.url()).namespace(NS))
            .await
            .unwrap(),
    );
    let second = b
        .acquire("k", owner("second"))
        .await
        .expect("the promoted replica never saw the first lock: a second holder gets in");
    assert!(
        second.fencing_token() > first_token,
        "tokens still order the holders: {} > {first_token}",
        second.fencing_token()
    );
    drop(proxy);
    master.stop();
}

/// Waiters are still served in order with replica acknowledgement (through
/// reservations and acknowledged claims rather than direct handoffs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_with_replica_acknowledgement() {
    let (master, _proxy, _replica) = pair().await;
    let config = RedisConfig::from_url(master.url())
        .namespace(NS)
        .wait_for_replicas(1, Duration::from_secs(2))
        .wait_fallback(Duration::from_secs(60));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    let held = m.acquire("k", owner("holder")).await.unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (m, order) = (m.clone(), std::sync::Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let lease = m
                .acquire(
                    "k",
                    owner(&format!("w{i}")).timeout(Duration::from_secs(10)),
                )
                .await
                .unwrap();
            order.lock().unwrap().push(i);
            assert!(lease.release().await.unwrap());
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held.release().await.unwrap());
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
}
