//! A master, its replicas and three sentinels, all on local ports.

use crate::{RedisServer, free_port, wait_until_in_sync};

/// The name the sentinels know the master by.
pub const MASTER_NAME: &str = "mymaster";

/// One monitored master and its watchers. Dropping it kills them all.
#[derive(Debug)]
pub struct SentinelSet {
    /// The master at the start.
    pub master: RedisServer,
    /// Its replicas, in sync.
    pub replicas: Vec<RedisServer>,
    /// Three sentinels, quorum 2.
    pub sentinels: Vec<RedisServer>,
}

impl SentinelSet {
    /// A master, `replicas` replicas in sync, and three sentinels (quorum
    /// 2, master down after 500 ms) that know each other and the replicas
    /// from their config files, so they are ready in about a second.
    ///
    /// # Panics
    ///
    /// When a server does not start.
    pub async fn start(replicas: usize) -> SentinelSet {
        let master = RedisServer::start(&[
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let master_port = master.port.to_string();
        let replicas: Vec<RedisServer> = (0..replicas)
            .map(|_| {
                RedisServer::start(&[
                    "--replicaof",
                    "127.0.0.1",
                    &master_port,
                    "--repl-diskless-sync",
                    "yes",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        for r in &replicas {
            wait_until_in_sync(&r.url()).await;
        }
        // Each sentinel's config names the others' ports: if one of the
        // ports was taken meanwhile, start the three again on fresh ones.
        let mut last_log = String::new();
        for _ in 0..5 {
            match start_sentinels(&master, &replicas) {
                Ok(sentinels) => {
                    return SentinelSet {
                        master,
                        replicas,
                        sentinels,
                    };
                }
                Err(log) => last_log = log,
            }
        }
        panic!("the sentinels did not start; the last log:\n{last_log}");
    }

    /// The sentinels' URLs (for `RedisConfig::from_sentinels`).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }
}

/// Three sentinels watching `master`, knowing its replicas and each other.
fn start_sentinels(
    master: &RedisServer,
    replicas: &[RedisServer],
) -> Result<Vec<RedisServer>, String> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let ids: Vec<String> = (0..3)
        .map(|i| format!("{:040x}", 0x5e_u64 + i as u64))
        .collect();
    (0..3)
        .map(|i| {
            let mut conf = format!(
                "sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 500\n\
                 sentinel failover-timeout {MASTER_NAME} 3000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n\
                 sentinel myid {}\n",
                master.port, ids[i]
            );
            for r in replicas {
                conf.push_str(&format!(
                    "sentinel known-replica {MASTER_NAME} 127.0.0.1 {}\n",
                    r.port
                ));
            }
            for j in (0..3).filter(|j| *j != i) {
                conf.push_str(&format!(
                    "sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {} {}\n",
                    ports[j], ids[j]
                ));
            }
            RedisServer::try_start_at(ports[i], Some(&conf), &["--sentinel"])
        })
        .collect()
}
