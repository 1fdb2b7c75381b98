//! `lockstep bench`: throughput, latency, fairness and cost of the Redis
//! provider, measured against a real server. Measurements, not tests: they
//! print JSON lines and assert nothing.
//!
//! - `w1`: C workers (default 64), each on its own key, acquire -> release.
//! - `w2`: C workers (default 16) on one key: acquire (waiting up to
//!   `--wait-timeout-ms`), INCR a holders counter on a separate connection
//!   (a result other than 1 is a violation), hold `--hold-us`, DECR, release.
//! - `w3`: C workers (default 32), each iteration locks 3 distinct keys drawn
//!   from 100, holds, releases.
//! - `mem`: holds 10,000 single-key locks and reports Redis memory per lock.
//! - `waiters`: `--waiters` (default 10,000) waiters on one key in this
//!   process, with a pool of 2 connections: all must be served, in order,
//!   before their deadline; reports client memory per waiter.
//!
//! Only operations that finish inside the window (`--duration`, default
//! 10 s) count; the database is flushed and one warm-up operation runs
//! before it.
//!
//! `w1`-`w3` run on any backend (`--redis-url`, `--cluster`, `--sentinel`,
//! `--redlock`, or one spawned here: `--spawn-redis`, `--spawn-cluster N`)
//! and report the commands each server ran (`commands_per_node`), so the
//! spread over a cluster's masters shows. `mem`, `waiters` and
//! `--baseline` need one server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{AcquireOptions, LockError, LockingModule, RedisConfig, RedisProvider};
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::backend::BackendArgs;
use crate::demo::{EXIT_OK, Failure};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    W1,
    W2,
    W3,
    Mem,
    Waiters,
}

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    workload: Workload,
    /// The Redis to measure against (flushed: see --flush). Its namespace
    /// is always `bench:`.
    #[command(flatten)]
    backend: BackendArgs,
    /// Start a redis-server of our own on a free loopback port.
    #[arg(long, conflicts_with_all = ["redis_url", "cluster", "sentinels", "redlock"])]
    spawn_redis: bool,
    /// Start a Redis Cluster of N masters of our own on free loopback ports.
    #[arg(long, value_name = "N", conflicts_with_all = ["spawn_redis", "redis_url", "cluster", "sentinels", "redlock"])]
    spawn_cluster: Option<usize>,
    /// The redis-server binary for --spawn-redis and --spawn-cluster.
    #[arg(long, default_value = "redis-server")]
    redis_server_bin: PathBuf,
    /// Flush a --redis-url database that is not empty (never done silently).
    #[arg(long)]
    flush: bool,
    /// Workers (default: 64 for w1, 16 for w2, 32 for w3).
    #[arg(long)]
    concurrency: Option<usize>,
    /// The measurement window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// How long each acquisition holds its lock(s), in microseconds.
    #[arg(long, default_value_t = 0)]
    hold_us: u64,
    /// Lease of each lock, ms.
    #[arg(long, default_value_t = 10_000)]
    ttl_ms: u64,
    /// How long an acquisition may wait, ms.
    #[arg(long, default_value_t = 5_000)]
    wait_timeout_ms: u64,
    /// Runs of the workload (one JSON line each, then a line of medians).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Barging instead of FIFO handoff.
    #[arg(long)]
    barging: bool,
    /// Poll instead of waiting for release notifications.
    #[arg(long)]
    no_notifications: bool,
    /// Anonymous locks instead of one named owner per worker.
    #[arg(long)]
    anonymous: bool,
    /// Waiters for the `waiters` workload.
    #[arg(long, default_value_t = 10_000)]
    waiters: usize,
    /// For w1: also run `redis-benchmark -c 50 -P 16` with the acquire
    /// script (EVALSHA) on the same server, and report the ratio.
    #[arg(long)]
    baseline: bool,
}

/// A redis-server we started, killed when dropped.
struct Spawned {
    child: tokio::process::Child,
    dir: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn spawn_redis(bin: &PathBuf, extra: &[String]) -> Result<(String, Spawned), Failure> {
    // A free port: bind port 0 and read it back (`--port 0` would turn TCP off).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Failure::usage(format!("no free port: {e}")))?
        .port();
    let dir = std::env::temp_dir().join(format!("lockstep-bench-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::usage(e.to_string()))?;
    let child = tokio::process::Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::usage(format!("cannot start {}: {e}", bin.display())))?;
    let spawned = Spawned { child, dir };
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(client) = redis::Client::open(url.as_str())
            && let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
        {
            return Ok((url, spawned));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(Failure::usage("the spawned redis-server did not start"))
}

/// A free loopback port.
fn free_port() -> Result<u16, Failure> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Failure::usage(format!("no free port: {e}")))
}

/// `masters` cluster-enabled servers sharing the slots evenly, introduced to
/// each other; returned once every node says the cluster is ok.
async fn spawn_cluster(
    bin: &PathBuf,
    masters: usize,
) -> Result<(Vec<String>, Vec<Spawned>), Failure> {
    if masters == 0 || masters > 64 {
        return Err(Failure::usage("--spawn-cluster takes 1 to 64 masters"));
    }
    let mut urls = Vec::new();
    let mut spawned = Vec::new();
    let mut buses = Vec::new();
    for _ in 0..masters {
        // The bus port is set: the default (port + 10000) may be taken.
        let bus = free_port()?;
        let extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus.to_string(),
            "--cluster-node-timeout",
            "1000",
        ]
        .map(str::to_owned);
        let (url, s) = spawn_redis(bin, &extra).await?;
        urls.push(url);
        spawned.push(s);
        buses.push(bus);
    }
    let fail = |e: redis::RedisError| Failure::usage(format!("cannot set the cluster up: {e}"));
    let step = 16384 / masters;
    let mut first = crate::backend::plain(&urls[0]).await.map_err(fail)?;
    for (i, url) in urls.iter().enumerate() {
        let last = if i + 1 == masters {
            16383
        } else {
            (i + 1) * step - 1
        };
        let mut c = crate::backend::plain(url).await.map_err(fail)?;
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(i * step)
            .arg(last)
            .exec_async(&mut c)
            .await
            .map_err(fail)?;
        if i > 0 {
            let port = url.rsplit(':').next().unwrap_or_default();
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(port)
                .arg(buses[i])
                .exec_async(&mut first)
                .await
                .map_err(fail)?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for url in &urls {
        let mut c = crate::backend::plain(url).await.map_err(fail)?;
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut c)
                .await
                .map_err(fail)?;
            if info.contains("cluster_state:ok") {
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure::usage(
                    "the spawned cluster did not form within 30 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok((urls, spawned))
}

pub(crate) async fn bench(args: BenchArgs) -> Result<u8, Failure> {
    let mut backend = args.backend.clone();
    let mut spawned = Vec::new();
    if args.spawn_redis {
        let (url, s) = spawn_redis(&args.redis_server_bin, &[]).await?;
        backend.redis_url = Some(url);
        spawned.push(s);
    } else if let Some(n) = args.spawn_cluster {
        let (urls, s) = spawn_cluster(&args.redis_server_bin, n).await?;
        backend.redis_url = None;
        backend.cluster = urls;
        spawned = s;
    } else if !backend.is_given() {
        return Err(Failure::usage(
            "give --spawn-redis, --spawn-cluster N, --redis-url URL, --cluster, --sentinel or --redlock",
        ));
    }
    if !backend.is_single()
        && (args.baseline || matches!(args.workload, Workload::Mem | Workload::Waiters))
    {
        return Err(Failure::usage(
            "mem, waiters and --baseline measure one server: use --redis-url or --spawn-redis",
        ));
    }
    let mut nodes = Nodes::connect(&backend).await?;
    let size = nodes.dbsize().await;
    if size > 0 && !args.flush && spawned.is_empty() {
        return Err(Failure::usage(format!(
            "the servers hold {size} keys; bench flushes them before each run: pass --flush to allow it, or use --spawn-redis"
        )));
    }
    let url = backend.redis_url.clone().unwrap_or_default();
    let mut results = Vec::new();
    for _ in 0..args.runs.max(1) {
        nodes.flush().await?;
        let run = match args.workload {
            Workload::W1 => contention(&args, &backend, &mut nodes, Shape::OwnKey).await?,
            Workload::W2 => contention(&args, &backend, &mut nodes, Shape::OneKey).await?,
            Workload::W3 => contention(&args, &backend, &mut nodes, Shape::ThreeOf100).await?,
            Workload::Mem => memory(&args, &url, &mut nodes.admins[0].1).await?,
            Workload::Waiters => waiters(&args, &url).await?,
        };
        println!("{run}");
        results.push(run);
    }
    if results.len() > 1 {
        println!("{}", medians(&results));
    }
    Ok(EXIT_OK)
}

/// An admin connection to each server that holds locks (by `host:port`).
struct Nodes {
    admins: Vec<(String, redis::aio::MultiplexedConnection)>,
    /// The first server's URL (credentials and database included).
    first_url: String,
}

impl Nodes {
    async fn connect(backend: &BackendArgs) -> Result<Nodes, Failure> {
        let mut admins = Vec::new();
        let nodes = backend.data_nodes().await.map_err(Failure::usage)?;
        for node in &nodes {
            // plain() sets no response timeout: flushing millions of keys
            // (the baseline leaves them) takes longer than redis-rs's
            // default half second.
            let conn = crate::backend::plain(&node.url).await.map_err(|e| {
                Failure::usage(format!("cannot reach Redis at {}: {e}", node.address))
            })?;
            admins.push((node.address.clone(), conn));
        }
        let first_url = nodes.first().map(|n| n.url.clone()).unwrap_or_default();
        Ok(Nodes { admins, first_url })
    }

    async fn dbsize(&mut self) -> u64 {
        let mut size = 0;
        for (_, c) in &mut self.admins {
            size += redis::cmd("DBSIZE")
                .query_async::<u64>(c)
                .await
                .unwrap_or(0);
        }
        size
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        for (node, c) in &mut self.admins {
            redis::cmd("FLUSHDB")
                .exec_async(c)
                .await
                .map_err(|e| Failure::usage(format!("{node}: {e}")))?;
        }
        Ok(())
    }

    /// Each server's command counts (INFO commandstats).
    async fn commandstats(&mut self) -> Vec<HashMap<String, u64>> {
        let mut all = Vec::new();
        for (_, c) in &mut self.admins {
            all.push(commandstats(c).await);
        }
        all
    }
}

/// The W2 harness's holders counter: on the one server, the cluster, the
/// master the sentinels name, or the first Redlock master.
#[derive(Clone)]
enum Counter {
    Plain(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Counter {
    async fn connect(backend: &BackendArgs, nodes: &Nodes) -> Result<Counter, Failure> {
        let fail = |e: redis::RedisError| Failure::usage(e.to_string());
        if !backend.cluster.is_empty() {
            let client =
                redis::cluster::ClusterClient::new(backend.cluster.clone()).map_err(fail)?;
            let conn = client.get_async_connection().await.map_err(fail)?;
            return Ok(Counter::Cluster(conn));
        }
        let conn = crate::backend::plain(&nodes.first_url)
            .await
            .map_err(fail)?;
        Ok(Counter::Plain(conn))
    }

    /// Adds `by` to the counter; its new value (`i64::MIN` on an error).
    async fn add(&mut self, by: i64) -> i64 {
        let result = match self {
            Counter::Plain(c) => c.incr("holders", by).await,
            Counter::Cluster(c) => c.incr("holders", by).await,
        };
        result.unwrap_or(i64::MIN)
    }
}

/// The bench's provider settings.
fn tune(config: RedisConfig, args: &BenchArgs, pool_size: usize) -> RedisConfig {
    config
        .namespace("bench:")
        .pool_size(pool_size)
        .fair(!args.barging)
        .notifications(!args.no_notifications)
}

async fn connect(args: &BenchArgs, url: &str, pool_size: usize) -> Result<RedisProvider, Failure> {
    connect_with(url, pool_size, !args.barging, !args.no_notifications).await
}

async fn connect_with(
    url: &str,
    pool_size: usize,
    fair: bool,
    notifications: bool,
) -> Result<RedisProvider, Failure> {
    let config = RedisConfig::from_url(url)
        .namespace("bench:")
        .pool_size(pool_size)
        .fair(fair)
        .notifications(notifications);
    RedisProvider::connect(config)
        .await
        .map_err(|e| Failure::usage(e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    OwnKey,
    OneKey,
    ThreeOf100,
}

/// What each worker recorded.
#[derive(Default)]
struct WorkerLog {
    /// (completion time, latency in µs) of each acquisition inside the window.
    done: Vec<(Instant, u64)>,
    timeouts: u64,
    violations: u64,
    errors: u64,
}

/// Sums of INFO commandstats calls by command.
async fn commandstats(admin: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// Commands the harness sends itself, left out of `redis_cmds_per_op`.
const HARNESS: [&str; 8] = [
    "incr", "decr", "incrby", "decrby", "info", "flushdb", "dbsize", "ping",
];

fn commands_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .filter(|(name, _)| !HARNESS.contains(&name.as_str()))
        .map(|(name, calls)| calls.saturating_sub(*before.get(name).unwrap_or(&0)))
        .sum()
}

fn percentiles(mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    let p = |q: f64| -> u64 {
        if v.is_empty() {
            return 0;
        }
        let rank = ((q / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    json!({"p50": p(50.0), "p99": p(99.0), "max": v.last().copied().unwrap_or(0)})
}

/// A small deterministic generator for key choices (no extra dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// W1, W2 and W3.
async fn contention(
    args: &BenchArgs,
    backend: &BackendArgs,
    nodes: &mut Nodes,
    shape: Shape,
) -> Result<Value, Failure> {
    let workers = args.concurrency.unwrap_or(match shape {
        Shape::OwnKey => 64,
        Shape::OneKey => 16,
        Shape::ThreeOf100 => 32,
    });
    let connected = backend
        .connect_with(|c| tune(c, args, 8))
        .await
        .map_err(Failure::usage)?;
    let (locking, provider) = (connected.module, connected.redis);
    // The holders counter lives on a connection of its own (multiplexed:
    // each worker uses a clone).
    let counter = Counter::connect(backend, nodes).await?;
    let options = |i: usize| {
        let mut o = AcquireOptions::new()
            .expire(Duration::from_millis(args.ttl_ms))
            .timeout(Duration::from_millis(args.wait_timeout_ms));
        if !args.anonymous {
            o = o.owner_id(format!("worker-{i}"));
        }
        o
    };
    // Warm-up: one operation (loads the scripts, opens the connections).
    let lease = locking
        .acquire("warm-up", options(0))
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    lease
        .release()
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;

    let window = Duration::from_secs_f64(args.duration);
    let go = Arc::new(tokio::sync::Barrier::new(workers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Mutex::new(Instant::now()));
    let hold = Duration::from_micros(args.hold_us);
    let mut tasks = Vec::new();
    for i in 0..workers {
        let (locking, go, stop, start) = (
            locking.clone(),
            Arc::clone(&go),
            Arc::clone(&stop),
            Arc::clone(&start),
        );
        let options = options(i);
        let mut counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = WorkerLog::default();
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0000_01B3));
            go.wait().await;
            let start = *start.lock().unwrap();
            let own = format!("key-{i}");
            while !stop.load(Ordering::Relaxed) {
                let keys: Vec<String> = match shape {
                    Shape::OwnKey => vec![own.clone()],
                    Shape::OneKey => vec!["the-key".to_owned()],
                    Shape::ThreeOf100 => {
                        let mut picked: Vec<String> = Vec::with_capacity(3);
                        while picked.len() < 3 {
                            let k = format!("key-{}", rng.next() % 100);
                            if !picked.contains(&k) {
                                picked.push(k);
                            }
                        }
                        picked
                    }
                };
                let began = Instant::now();
                let lease = match locking.acquire(keys.clone(), options.clone()).await {
                    Ok(lease) => lease,
                    Err(e) if e.is_contended() => {
                        log.timeouts += 1;
                        continue;
                    }
                    Err(_) => {
                        log.errors += 1;
                        continue;
                    }
                };
                let waited = began.elapsed();
                if shape == Shape::OneKey && counter.add(1).await != 1 {
                    log.violations += 1;
                }
                if !hold.is_zero() {
                    hold_for(hold).await;
                }
                if shape == Shape::OneKey {
                    counter.add(-1).await;
                }
                match lease.release().await {
                    Ok(true) => {}
                    _ => log.errors += 1,
                }
                let now = Instant::now();
                if now >= start && now <= start + window {
                    log.done.push((now, waited.as_micros() as u64));
                }
            }
            log
        }));
    }
    let trips = || provider.as_ref().map(RedisProvider::round_trips);
    let stats_before = nodes.commandstats().await;
    let trips_before = trips();
    *start.lock().unwrap() = Instant::now();
    go.wait().await;
    tokio::time::sleep(window).await;
    let trips_after = trips();
    let stats_after = nodes.commandstats().await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.map_err(|e| Failure::usage(e.to_string()))?);
    }
    locking.shutdown().await;

    let ops: u64 = logs.iter().map(|l| l.done.len() as u64).sum();
    let per_s = ops as f64 / window.as_secs_f64();
    let latencies: Vec<u64> = logs
        .iter()
        .flat_map(|l| l.done.iter().map(|d| d.1))
        .collect();
    let timeouts: u64 = logs.iter().map(|l| l.timeouts).sum();
    let violations: u64 = logs.iter().map(|l| l.violations).sum();
    let errors: u64 = logs.iter().map(|l| l.errors).sum();
    let per_op = |n: u64| {
        if ops == 0 {
            0.0
        } else {
            round2(n as f64 / ops as f64)
        }
    };
    let per_node: Vec<u64> = stats_before
        .iter()
        .zip(&stats_after)
        .map(|(b, a)| commands_between(b, a))
        .collect();
    let redis_cmds = per_op(per_node.iter().sum());
    let params = json!({
        "concurrency": workers, "duration_s": args.duration, "hold_us": args.hold_us,
        "ttl_ms": args.ttl_ms, "wait_timeout_ms": args.wait_timeout_ms,
        "fair": !args.barging, "notifications": !args.no_notifications, "owners": !args.anonymous,
    });
    let mut results = match shape {
        Shape::OwnKey => json!({
            "pairs_per_s": round2(per_s), "acquire_us": percentiles(latencies),
        }),
        _ => json!({
            "acq_per_s": round2(per_s), "wait_us": percentiles(latencies),
            "timeouts": timeouts, "violations": violations,
        }),
    };
    results["errors"] = json!(errors);
    if let (Some(before), Some(after)) = (trips_before, trips_after) {
        results["client_cmds_per_op"] = json!(per_op(after - before));
    }
    results["redis_cmds_per_op"] = json!(redis_cmds);
    let spread: serde_json::Map<String, Value> = nodes
        .admins
        .iter()
        .zip(&per_node)
        .map(|((node, _), n)| (node.clone(), json!(n)))
        .collect();
    results["commands_per_node"] = Value::Object(spread);
    if shape == Shape::OneKey {
        let counts: Vec<u64> = logs.iter().map(|l| l.done.len() as u64).collect();
        let sum: f64 = counts.iter().map(|&c| c as f64).sum();
        let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
        let jain = if squares == 0.0 {
            0.0
        } else {
            sum * sum / (counts.len() as f64 * squares)
        };
        results["fairness"] = json!({
            "min": counts.iter().min(), "max": counts.iter().max(),
            "jain": (jain * 10_000.0).round() / 10_000.0, "per_worker": counts,
        });
        if backend.is_single() {
            // The serial limit: one holder at a time, each paying the hold
            // and the two harness round trips (INCR, DECR) at PING speed,
            // with a lock that cost nothing.
            let ping = ping_us(&mut nodes.admins[0].1).await;
            let limit = 1e6 / (args.hold_us as f64 + 2.0 * ping);
            results["ping_us"] = json!(round2(ping));
            results["serial_limit_per_s"] = json!(round2(limit));
            results["of_serial_limit"] = json!(round2(per_s / limit));
        }
    }
    if shape == Shape::OwnKey
        && args.baseline
        && let Some(url) = &backend.redis_url
        && let Some(b) = baseline(url, args).await
    {
        results["baseline_evalsha_per_s"] = json!(round2(b));
        results["ops_per_s_vs_baseline"] = json!(round2(2.0 * per_s / b));
    }
    let name = match shape {
        Shape::OwnKey => "w1",
        Shape::OneKey => "w2",
        Shape::ThreeOf100 => "w3",
    };
    Ok(json!({"workload": name, "backend": connected.kind, "params": params, "results": results}))
}

/// Holds for `d`, precisely: Tokio's timer has a 1 ms granularity and
/// rounds up (a 1 ms sleep lasts 1-2 ms), which would turn a 1 ms hold into
/// 1.5 ms on average. The last millisecond is spent yielding instead.
async fn hold_for(d: Duration) {
    let until = Instant::now() + d;
    if d > Duration::from_millis(2) {
        tokio::time::sleep(d - Duration::from_millis(2)).await;
    }
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The median PING round trip, in µs, over 200 pings.
async fn ping_us(admin: &mut redis::aio::MultiplexedConnection) -> f64 {
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let _: Result<String, _> = redis::cmd("PING").query_async(admin).await;
        samples.push(t.elapsed().as_micros() as u64);
    }
    samples.sort_unstable();
    samples[samples.len() / 2] as f64
}

/// `redis-benchmark -c 50 -P 16` running the acquire script (EVALSHA) on
/// the same server; its EVALSHA requests per second. Keys are drawn from
/// 10^8, so nearly every call takes a free lock, as every W1 call does.
async fn baseline(url: &str, args: &BenchArgs) -> Option<f64> {
    let port = url
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse::<u16>()
        .ok()?;
    // Load the script exactly as the provider does (prelude + acquire.lua).
    let script = redis::Script::new(concat!(
        include_str!("../../../lua/prelude.lua"),
        "\n",
        include_str!("../../../lua/acquire.lua")
    ));
    let mut c = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let sha: String = script.prepare_invoke().load_async(&mut c).await.ok()?;
    let requests = ((args.duration * 100_000.0) as u64)
        .max(100_000)
        .to_string();
    // The same call shape as the workload: with an owner, its index too.
    let port = port.to_string();
    let ttl = args.ttl_ms.to_string();
    let mut command = tokio::process::Command::new("redis-benchmark");
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-c",
            "50",
            "-P",
            "16",
            "-n",
            &requests,
        ])
        .args(["-r", "100000000", "--csv", "EVALSHA", &sha])
        .arg(if args.anonymous { "3" } else { "4" })
        .args([
            "bench:{k__rand_int__}",
            "bench:{T}:f",
            "bench:{k__rand_int__}:q",
        ]);
    if !args.anonymous {
        command.arg("bench:{w__rand_int__}:o");
    }
    let out = command
        .args(["1", if args.anonymous { "" } else { "worker-1" }])
        .args([
            "0123456789ab",
            &ttl,
            "",
            "",
            "1",
            "10000",
            "2000",
            "bench:c:",
            "0",
        ])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: "test","rps",...; the second line holds the numbers.
    let line = text.lines().find(|l| l.starts_with("\"EVALSHA"))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

/// Redis memory per held single-key lock, fencing state included.
async fn memory(
    args: &BenchArgs,
    url: &str,
    admin: &mut redis::aio::MultiplexedConnection,
) -> Result<Value, Failure> {
    const LOCKS: usize = 10_000;
    let provider = connect(args, url, 8).await?;
    let locking = LockingModule::builder()
        .provider("locking-redis", provider)
        .build()
        .expect("one provider");
    let used = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = used(
        redis::cmd("INFO")
            .arg("memory")
            .query_async(admin)
            .await
            .unwrap_or_default(),
    );
    let mut leases = Vec::with_capacity(LOCKS);
    for i in 0..LOCKS {
        let mut o = AcquireOptions::new().expire(Duration::from_millis(args.ttl_ms.max(60_000)));
        if !args.anonymous {
            o = o.owner_id(format!("owner-{i}"));
        }
        leases.push(
            locking
                .acquire(format!("order_{i:06}"), o)
                .await
                .map_err(|e| Failure::usage(e.to_string()))?,
        );
    }
    let after = used(
        redis::cmd("INFO")
            .arg("memory")
            .query_async(admin)
            .await
            .unwrap_or_default(),
    );
    let mut by_kind: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(admin)
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
        for k in keys {
            let bytes: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&k)
                .query_async(admin)
                .await
                .unwrap_or(0);
            let kind = if k.ends_with(":f") {
                "fencing_counters"
            } else if k.ends_with(":o") {
                "owner_indexes"
            } else if k.ends_with(":q") {
                "queues"
            } else {
                "locks"
            };
            let e = by_kind.entry(kind).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let total: u64 = by_kind.values().map(|v| v.1).sum();
    let kinds: serde_json::Map<String, Value> = by_kind
        .iter()
        .map(|(k, (n, b))| {
            (
                (*k).to_owned(),
                json!({"keys": n, "bytes": b, "bytes_per_lock": round2(*b as f64 / LOCKS as f64)}),
            )
        })
        .collect();
    locking.shutdown().await;
    Ok(json!({
        "workload": "mem",
        "params": {"locks": LOCKS, "owners": !args.anonymous},
        "results": {
            "memory_usage_bytes_per_lock": round2(total as f64 / LOCKS as f64),
            "used_memory_bytes_per_lock": round2(after.saturating_sub(before) as f64 / LOCKS as f64),
            "by_kind": kinds,
        }
    }))
}

/// The resident set size of this process, in bytes (Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Many waiters on one key in this process, with a small pool. Runs on a
/// runtime of its own with one thread, where tasks first run in the order
/// they were spawned: arrival order is spawn order, so the order they are
/// served in can be checked exactly.
async fn waiters(args: &BenchArgs, url: &str) -> Result<Value, Failure> {
    let (n, fair, notifications) = (args.waiters, !args.barging, !args.no_notifications);
    let deadline = Duration::from_millis(args.wait_timeout_ms.max(60_000));
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::usage(e.to_string()))?;
        runtime.block_on(waiters_in_order(url, n, fair, notifications, deadline))
    })
    .await
    .map_err(|e| Failure::usage(e.to_string()))?
}

async fn waiters_in_order(
    url: String,
    n: usize,
    fair: bool,
    notifications: bool,
    deadline: Duration,
) -> Result<Value, Failure> {
    let provider = connect_with(&url, 2, fair, notifications).await?;
    let locking = LockingModule::builder()
        .provider("locking-redis", provider.clone())
        .build()
        .expect("one provider");
    let held = locking
        .acquire("the-key", AcquireOptions::new().owner_id("holder"))
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    let rss_before = rss_bytes();
    let order = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let served_late = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let trips_before = provider.round_trips();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (locking, order, late, failed) = (
            locking.clone(),
            Arc::clone(&order),
            Arc::clone(&served_late),
            Arc::clone(&failed),
        );
        let enqueued = Instant::now();
        tasks.push(tokio::spawn(async move {
            let owner = format!("w{i}");
            match locking
                .acquire(
                    "the-key",
                    AcquireOptions::new().owner_id(&owner).timeout(deadline),
                )
                .await
            {
                Ok(lease) => {
                    if enqueued.elapsed() > deadline {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    order.lock().unwrap().push(i);
                    let _ = lease.release().await;
                }
                Err(LockError::TimedOut { .. }) | Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Let every waiter run to its first wait (in spawn order) and queue up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_waiting = rss_bytes();
    let queue_len: u64 = redis::Client::open(url.as_str())
        .map_err(|e| Failure::usage(e.to_string()))?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Failure::usage(e.to_string()))?
        .llen("bench:{the-key}:q")
        .await
        .unwrap_or(0);
    let released_at = Instant::now();
    held.release()
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    for t in tasks {
        t.await.map_err(|e| Failure::usage(e.to_string()))?;
    }
    let drained = released_at.elapsed();
    let trips = provider.round_trips() - trips_before;
    locking.shutdown().await;
    let order = order.lock().unwrap();
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    let per_waiter = match (rss_before, rss_waiting) {
        (Some(a), Some(b)) => json!(round2(b.saturating_sub(a) as f64 / n as f64)),
        _ => Value::Null,
    };
    Ok(json!({
        "workload": "waiters",
        "params": {"waiters": n, "pool_size": 2, "deadline_ms": deadline.as_millis() as u64, "runtime": "current_thread"},
        "results": {
            "served": order.len(), "failed": failed.load(Ordering::Relaxed),
            "served_after_deadline": served_late.load(Ordering::Relaxed),
            "order_inversions": inversions, "redis_queue_entries_while_waiting": queue_len,
            "drain_ms": drained.as_millis() as u64, "setup_ms": (released_at - started).as_millis() as u64,
            "acq_per_s": round2(order.len() as f64 / drained.as_secs_f64()),
            "client_cmds_per_op": round2(trips as f64 / n as f64),
            "client_rss_bytes_per_waiter": per_waiter,
        }
    }))
}

/// The medians of every numeric result across runs.
fn medians(runs: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(Value::Object(first)) = runs[0].get("results") {
        for (k, v) in first {
            if v.is_number() {
                let mut xs: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r["results"][k].as_f64())
                    .collect();
                xs.sort_by(|a, b| a.total_cmp(b));
                out.insert(k.clone(), json!(xs[xs.len() / 2]));
            } else if let Value::Object(inner) = v {
                let mut m = serde_json::Map::new();
                for (ik, iv) in inner {
                    if iv.is_number() {
                        let mut xs: Vec<f64> = runs
                            .iter()
                            .filter_map(|r| r["results"][k][ik].as_f64())
                            .collect();
                        xs.sort_by(|a, b| a.total_cmp(b));
                        m.insert(ik.clone(), json!(xs[xs.len() / 2]));
                    }
                }
                out.insert(k.clone(), Value::Object(m));
            }
        }
    }
    json!({"workload": runs[0]["workload"], "params": runs[0]["params"], "median_of": runs.len(), "results": out})
}
