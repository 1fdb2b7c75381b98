//! The Redlock provider against five independent redis-servers: the
//! provider contract, and the quorum with masters down.

mod contract;
mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use contract::{Fixture, contract_suite};
use lockstep::{AcquireOptions, LockingModule, RedisConfig, RedlockProvider, ReleaseOptions};
use redis::AsyncCommands;
use support::{RedisServer, raw_connection};
use tokio::time::Instant;

/// Five masters shared by this test binary's contract cases.
fn masters() -> &'static [RedisServer] {
    static MASTERS: OnceLock<Vec<RedisServer>> = OnceLock::new();
    MASTERS.get_or_init(|| (0..5).map(|_| RedisServer::start(&[])).collect())
}

fn urls(servers: &[RedisServer]) -> Vec<String> {
    servers.iter().map(RedisServer::url).collect()
}

async fn redlock(urls: &[String], namespace: &str) -> RedlockProvider {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let config = RedisConfig::default()
        .namespace(namespace)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500));
    RedlockProvider::connect(&urls, config)
        .await
        .expect("a quorum of masters")
}

fn module(p: RedlockProvider) -> LockingModule {
    LockingModule::builder()
        .provider("locking-redlock", p)
        .build()
        .unwrap()
}

async fn fixture() -> Fixture {
    let namespace = support::unique_namespace();
    let urls = urls(masters());
    let provider = redlock(&urls, &namespace).await;
    let peer = module(redlock(&urls, &namespace).await);
    // Redlock's waiters poll: no registry.
    let residue = support::redis_residue(Vec::new(), urls.clone(), namespace.clone());
    Fixture {
        module: module(provider.clone()),
        peer,
        provider: Arc::new(provider),
        residue,
        fifo: false,
    }
}

contract_suite!(fixture);

/// With 2 of 5 masters down the lock works; with 3 down it refuses, with a
/// typed error, within the timeouts; and a release reaches every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_holds_with_two_masters_down_and_not_with_three() {
    let mut servers: Vec<RedisServer> = (0..5).map(|_| RedisServer::start(&[])).collect();
    let urls = urls(&servers);
    let p = redlock(&urls, "q:").await;
    assert_eq!(p.quorum(), 3);
    let m = module(p);
    let opts = || {
        AcquireOptions::new()
            .owner_id("u")
            .expire(Duration::from_secs(10))
    };

    // All up: the lock reaches every master (the call returns once a
    // majority has it; the others follow), and is released from every master.
    let lease = m.acquire("k", opts()).await.unwrap();
    for s in &servers {
        let c = raw_connection(&s.url()).await;
        support::eventually(Duration::from_secs(2), "the lock on every master", || {
            let mut c = c.clone();
            async move { c.exists::<_, bool>("q:{k}").await.unwrap() }
        })
        .await;
    }
    assert!(lease.release().await.unwrap());
    for s in &servers {
        let mut c = raw_connection(&s.url()).await;
        assert!(!c.exists::<_, bool>("q:{k}").await.unwrap());
    }

    servers[0].stop();
    servers[1].stop();
    let lease = m.acquire("k", opts()).await.expect("3 of 5 is a quorum");
    assert!(
        m.acquire("k", AcquireOptions::new().owner_id("other"))
            .await
            .unwrap_err()
            .is_contended()
    );
    assert!(lease.release().await.unwrap());

    servers[2].stop();
    let started = Instant::now();
    let e = m.acquire("k", opts()).await.unwrap_err();
    assert!(e.is_backend(), "2 of 5 is no quorum: {e:?}");
    assert!(e.to_string().contains("quorum"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        m.release("k", ReleaseOptions::new().owner_id("u"))
            .await
            .is_err()
    );
}

/// A lock held on a majority by someone else is contended, and an
/// acquisition that got only a minority gives it back everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_acquisition_is_given_back() {
    let servers: Vec<RedisServer> = (0..5).map(|_| RedisServer::start(&[])).collect();
    let urls = urls(&servers);
    let m = module(redlock(&urls, "m:").await);
    // Someone else holds "k" directly on 3 masters.
    for s in &servers[..3] {
        let mut c = raw_connection(&s.url()).await;
        let _: () = c.set("m:{k}", "someone-else0123456789ab").await.unwrap();
    }
    let e = m
        .acquire("k", AcquireOptions::new().owner_id("u"))
        .await
        .unwrap_err();
    assert!(e.is_contended(), "{e:?}");
    // The two masters where "k" was free hold nothing of ours.
    for s in &servers[3..] {
        let mut c = raw_connection(&s.url()).await;
        assert!(!c.exists::<_, bool>("m:{k}").await.unwrap(), "given back");
    }
}

#[tokio::test]
async fn fewer_than_three_masters_is_a_setting_error() {
    let e = RedlockProvider::connect(
        &["redis://127.0.0.1:1", "redis://127.0.0.1:2"],
        RedisConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            lockstep::ConfigError::InvalidSetting { name: "urls", .. }
        ),
        "{e:?}"
    );
}

/// Finding 2: an acquisition dropped during its fan-out (the masters paused,
/// so the scripts are sent but wait) leaves no lock on any master once they
/// resume: the set gives back by nonce everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_acquisition_leaves_nothing_on_the_masters() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start(&[])).collect();
    let urls = urls(&servers);
    let ns = support::unique_namespace();
    let m = module(redlock(&urls, &ns).await);
    // Warm up: connections and scripts.
    m.acquire("warm", AcquireOptions::new()).await.unwrap();
    m.release("warm", ReleaseOptions::new()).await.unwrap();
    for s in &servers {
        let mut c = raw_connection(&s.url()).await;
        let _: () = redis::cmd("CLIENT")
            .arg(&["PAUSE", "300", "WRITE"])
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let attempt = tokio::time::timeout(
        Duration::from_millis(50),
        m.acquire("k", AcquireOptions::new().owner_id("a")),
    )
    .await;
    assert!(attempt.is_err(), "dropped while the masters were paused");
    // The pause ends; the scripts sent meanwhile run.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let key = format!("{ns}{{k}}");
    support::eventually(Duration::from_secs(3), "k free on every master", || {
        let (servers, key) = (&servers, key.clone());
        async move {
            for s in servers {
                let mut c = raw_connection(&s.url()).await;
                if c.exists::<_, bool>(&key).await.unwrap() {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let lease = m
        .acquire("k", AcquireOptions::new().owner_id("b"))
        .await
        .unwrap();
    assert!(lease.release().await.unwrap());
}

/// `connect` dropped at every poll, on three masters of its own: no
/// connection to any of them stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connect_leaves_no_connection_behind() {
    let own: Vec<RedisServer> = (0..3).map(|_| RedisServer::start(&[])).collect();
    let urls = urls(&own);
    support::dropped_connects_leave_no_client(&urls, || {
        let urls = urls.clone();
        async move {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            RedlockProvider::connect(&urls, RedisConfig::default()).await
        }
    })
    .await;
}
