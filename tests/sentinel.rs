//! Sentinel: a master, its replica and three sentinels, all local; the
//! provider finds the master through the sentinels and follows a failover.

mod support;

use std::time::Duration;

use lockstep::{AcquireOptions, RedisConfig, RedisProvider};
use redis::AsyncCommands;
use support::{RedisServer, eventually, free_port, module_with, raw_connection};
use tokio::time::Instant;

const NS: &str = "sent:";

struct Topology {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
}

impl Topology {
    /// A master, a replica in sync, and three sentinels that know each other
    /// and the replica from their config files (ready in about a second).
    async fn start() -> Topology {
        let master = RedisServer::start(&[
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
        support::wait_until_in_sync(&replica.url()).await;
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let ids: Vec<String> = (0..3)
            .map(|i| format!("{:040x}", 0x5e_u64 + i as u64))
            .collect();
        let sentinels = (0..3)
            .map(|i| {
                let mut conf = format!(
                    "sentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 500\n\
                     sentinel failover-timeout mymaster 3000\n\
                     sentinel parallel-syncs mymaster 1\n\
                     sentinel myid {}\n\
                     sentinel known-replica mymaster 127.0.0.1 {}\n",
                    master.port, ids[i], replica.port
                );
                for j in (0..3).filter(|j| *j != i) {
                    conf.push_str(&format!(
                        "sentinel known-sentinel mymaster 127.0.0.1 {} {}\n",
                        ports[j], ids[j]
                    ));
                }
                RedisServer::start_with(Some(ports[i]), Some(&conf), &["--sentinel"])
            })
            .collect();
        Topology {
            master,
            replica,
            sentinels,
        }
    }

    fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }
}

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
    let topo = Topology::start().await;
    let config = RedisConfig::from_sentinels(topo.sentinel_urls(), "mymaster").namespace(NS);
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    let before = m.acquire("before", owner("a")).await.unwrap();
    let mut old = raw_connection(&topo.master.url()).await;
    let new = raw_connection(&topo.replica.url()).await;
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
    let replica_url = topo.replica.url();
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
