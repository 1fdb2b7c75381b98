//! Sentinel: a master, its replica and three sentinels, all local; the
//! provider finds the master through the sentinels and follows a failover.

mod support;

use std::time::Duration;

use lockstep::{AcquireOptions, RedisConfig, RedisProvider};
use redis::AsyncCommands;
use support::sentinel::SentinelSet;
use support::{eventually, free_port, module_with, raw_connection};
use tokio::time::Instant;

const NS: &str = "sent:";

/// One command on a connection of its own; `None` if the server is busy
/// changing roles (Sentinel kills clients then).
async fn ask<T: redis::FromRedisValue>(url: &str, command: &[&str]) -> Option<T> {
    let mut c = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let mut cmd = redis::cmd(command[0]);
    cmd.arg(&command[1..]);
    cmd.query_async(&mut c).await.ok()
}

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new()
        .owner_id(o)
        .expire(Duration::from_secs(60))
}

/// The provider finds the master through the sentinels, and after a
/// failover its writes go to the promoted replica within about a second;
/// a lock taken (and replicated) before the failover is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_follows_a_sentinel_failover() {
    let topo = SentinelSet::start(1).await;
    let config = RedisConfig::from_sentinels(topo.sentinel_urls(), "mymaster").namespace(NS);
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    let before = m.acquire("before", owner("a")).await.unwrap();
    let mut old = raw_connection(&topo.master.url()).await;
    let new = raw_connection(&topo.replicas[0].url()).await;
    assert!(
        old.exists::<_, bool>(format!("{NS}{{before}}"))
            .await
            .unwrap(),
        "on the master"
    );
    eventually(Duration::from_secs(5), "replicated", || {
        let mut new = new.clone();
        async move {
            new.exists::<_, bool>(format!("{NS}{{before}}"))
                .await
                .unwrap()
        }
    })
    .await;

    let mut s = raw_connection(&topo.sentinels[0].url()).await;
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg("mymaster")
        .query_async(&mut s)
        .await
        .unwrap();
    let started = Instant::now();
    // Sentinel kills the clients of a promoted or demoted server: every
    // check from here on uses a connection of its own.
    let replica_url = topo.replicas[0].url();
    eventually(Duration::from_secs(10), "the replica is promoted", || {
        let url = replica_url.clone();
        async move {
            ask::<String>(&url, &["INFO", "replication"])
                .await
                .is_some_and(|i| i.contains("role:master"))
        }
    })
    .await;
    let promoted = Instant::now();
    let mut i = 0;
    eventually(
        Duration::from_secs(10),
        "writes reach the promoted replica",
        || {
            i += 1;
            let (m, url, key) = (m.clone(), replica_url.clone(), format!("after-{i}"));
            async move {
                let Ok(lease) = m.acquire(key.as_str(), owner("a")).await else {
                    return false;
                };
                let landed =
                    ask::<bool>(&url, &["EXISTS", &format!("{NS}{{{key}}}")]).await == Some(true);
                let _ = lease.release().await;
                landed
            }
        },
    )
    .await;
    let followed = promoted.elapsed();
    println!(
        "promotion {:?} after SENTINEL FAILOVER; writes followed {followed:?} later",
        promoted - started
    );
    assert!(followed < Duration::from_secs(3), "{followed:?}");
    // The lock taken before the failover survived it (it was replicated).
    assert!(
        m.acquire("before", AcquireOptions::new().owner_id("b"))
            .await
            .is_err()
    );
    assert!(before.release().await.unwrap());
    assert_eq!(
        ask::<bool>(&replica_url, &["EXISTS", &format!("{NS}{{before}}")]).await,
        Some(false)
    );
}

/// No sentinel answers: a clear startup error within the connect timeout.
#[tokio::test]
async fn unreachable_sentinels_are_a_startup_error() {
    let config =
        RedisConfig::from_sentinels([format!("redis://127.0.0.1:{}", free_port())], "mymaster")
            .connect_timeout(Duration::from_millis(300));
    let e = RedisProvider::connect(config).await.unwrap_err();
    assert!(
        matches!(e, lockstep::ConfigError::Unreachable { .. }),
        "{e:?}"
    );
    let config = RedisConfig::from_sentinels(Vec::<String>::new(), "mymaster");
    assert!(RedisProvider::connect(config).await.is_err());
}
