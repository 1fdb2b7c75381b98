//! The checkout demo through failovers, run as a user would: 4 worker
//! processes charge 400 orders with `--wait-for-replicas 1` while the
//! master under them is killed (`kill -9`): one master of a Redis Cluster,
//! or the master Sentinel watches. The ledger (the payment provider's
//! record) lives on a plain server of its own, so the failover cannot
//! rewrite what the run is judged by. No order may be charged twice, and
//! every order must be charged. A binary of its own: it kills servers.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::RedisServer;
use support::cluster::{Cluster, is_master};
use support::sentinel::{MASTER_NAME, SentinelSet};
use tokio::time::Instant;

/// Starts the demo in the background.
fn start_demo(backend: &[String], ledger: &RedisServer) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["demo", "--json", "--orders", "400", "--charge-ms", "10"])
        // Long enough to ride out a failover (2-3 s here).
        .args(["--lock-timeout-ms", "20000", "--ttl-ms", "10000"])
        .args(["--wait-for-replicas", "1"])
        .args(backend)
        .args(["--ledger-url", &ledger.url()])
        .env_remove("LOCKING_REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockstep demo")
}

/// Charges recorded so far in the ledger (every run's).
async fn charges(ledger: &RedisServer) -> u64 {
    let mut c = support::raw_connection(&ledger.url()).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:charges")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    let mut n = 0;
    for k in keys {
        let all: Vec<u64> = redis::cmd("HVALS")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        n += all.iter().sum::<u64>();
    }
    n
}

/// Waits for the demo to exit (within a deadline) and returns its report.
async fn finish(mut demo: Child) -> (Option<i32>, Value, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = demo.try_wait().expect("wait for the demo") {
            let out = demo.wait_with_output().expect("demo output");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
                panic!(
                    "not one JSON object ({e}): {stdout}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return (status.code(), report, stderr);
        }
        if Instant::now() > deadline {
            let _ = demo.kill();
            panic!("the demo did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_every_order_charged_once(status: Option<i32>, report: &Value) {
    assert_eq!(report["double_charges"], 0, "{report}");
    assert_eq!(report["charged_orders"], 400, "{report}");
    assert_eq!(report["uncharged_orders"], 0, "{report}");
    assert_eq!(status, Some(0), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_mid_demo_costs_no_double_charge() {
    // Two replicas per master: after the kill the promoted one still has a
    // replica to acknowledge acquisitions.
    let cluster = Cluster::start_with(3, 2);
    let ledger = RedisServer::start(&[]);
    let demo = start_demo(&["--cluster".to_owned(), cluster.urls().join(",")], &ledger);
    support::eventually(
        Duration::from_secs(30),
        "40 charges before the kill",
        || async { charges(&ledger).await >= 40 },
    )
    .await;
    cluster.masters[0].signal("KILL");
    let killed = Instant::now();
    support::eventually(Duration::from_secs(20), "a replica promoted", || async {
        cluster.replicas_of(0).iter().any(is_master)
    })
    .await;
    let promoted = killed.elapsed();
    let charged_at_kill = charges(&ledger).await;
    let (status, report, stderr) = finish(demo).await;
    eprintln!(
        "cluster: killed after ~40 charges ({charged_at_kill} when promoted after {promoted:?}); report: {report}\n{stderr}"
    );
    assert_every_order_charged_once(status, &report);
    assert_eq!(report["provider"], "locking-redis-cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_killed_mid_demo_costs_no_double_charge() {
    let set = SentinelSet::start(2).await;
    let ledger = RedisServer::start(&[]);
    let demo = start_demo(
        &[
            "--sentinel".to_owned(),
            set.sentinel_urls().join(","),
            "--sentinel-master".to_owned(),
            MASTER_NAME.to_owned(),
        ],
        &ledger,
    );
    support::eventually(
        Duration::from_secs(30),
        "40 charges before the kill",
        || async { charges(&ledger).await >= 40 },
    )
    .await;
    set.master.signal("KILL");
    let killed = Instant::now();
    support::eventually(Duration::from_secs(20), "a replica promoted", || async {
        set.replicas.iter().any(is_master)
    })
    .await;
    let promoted = killed.elapsed();
    let (status, report, stderr) = finish(demo).await;
    eprintln!("sentinel: promoted after {promoted:?}; report: {report}\n{stderr}");
    assert_every_order_charged_once(status, &report);
    assert_eq!(report["provider"], "locking-redis-sentinel");
}
