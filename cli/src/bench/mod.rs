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
//! spread over a cluster's masters shows, and the servers' and this
//! process's CPU time per operation (`redis_cpu_us_per_op`,
//! `client_cpu_us_per_op`). `--baseline` runs a bare lock beside lockstep
//! in each run (see `baseline.rs`) and reports `vs_bare`. `mem`, `waiters`
//! and `--baseline` need one server.

mod baseline;
mod contention;
mod memory;
mod stats;
mod waiters;

use std::path::PathBuf;

use lockstep::{RedisConfig, RedisProvider};
use lockstep_testkit::RedisServer;
use lockstep_testkit::cluster::Cluster;

use crate::backend::BackendArgs;
use crate::failure::{EXIT_OK, Failure};
use contention::Shape;
use stats::{Nodes, medians};

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
    /// Start a PostgreSQL of our own (the test kit's: initdb in a temporary
    /// directory, a free loopback port) and measure the Postgres provider
    /// (w1-w3 only, no bare lock).
    #[arg(long, conflicts_with_all = ["spawn_redis", "spawn_cluster", "redis_url", "cluster", "sentinels", "redlock", "postgres_url"])]
    spawn_postgres: bool,
    /// The redis-server binary for --spawn-redis and --spawn-cluster
    /// (default: `LOCKSTEP_REDIS_SERVER_BIN`, else redis-server in PATH).
    #[arg(long)]
    redis_server_bin: Option<PathBuf>,
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
    /// Run the scripts by EVALSHA, not as the Redis function library
    /// (FCALL), to compare the two.
    #[arg(long)]
    no_functions: bool,
    /// Anonymous locks instead of one named owner per worker.
    #[arg(long)]
    anonymous: bool,
    /// Waiters for the `waiters` workload.
    #[arg(long, default_value_t = 10_000)]
    waiters: usize,
    /// For w1-w3: also run a bare lock (SET NX PX, compare-and-delete; see
    /// bench/baseline.rs) in the same run, on the same server and client
    /// shape, and report `vs_bare`: lockstep's rate over the bare lock's.
    #[arg(long)]
    baseline: bool,
}

pub(crate) async fn bench(args: BenchArgs) -> Result<u8, Failure> {
    let mut backend = args.backend.clone();
    if let Some(bin) = &args.redis_server_bin {
        lockstep_testkit::set_server_bin(bin);
    }
    // Servers started here, stopped when this returns.
    let mut _single = None;
    let mut _cluster = None;
    let mut _postgres = None;
    if args.spawn_postgres {
        let server = lockstep_testkit::PostgresServer::try_start().map_err(Failure::usage)?;
        backend.postgres_url = Some(server.url());
        _postgres = Some(server);
    }
    if backend.postgres_url.is_some() {
        // Its own schema unless one is given, as Redis gets the `bench:`
        // namespace.
        if backend.pg_schema == lockstep::DEFAULT_SCHEMA {
            backend.pg_schema = "lockstep_bench".to_owned();
        }
        if args.baseline || !matches!(args.workload, Workload::W1 | Workload::W2 | Workload::W3) {
            return Err(Failure::usage(
                "on PostgreSQL the bench measures w1, w2 and w3, without --baseline",
            ));
        }
    } else if args.spawn_redis {
        let server = RedisServer::try_start_with(None, None, &[]).map_err(Failure::usage)?;
        backend.redis_url = Some(server.url());
        _single = Some(server);
    } else if let Some(n) = args.spawn_cluster {
        if n == 0 || n > 64 {
            return Err(Failure::usage("--spawn-cluster takes 1 to 64 masters"));
        }
        let cluster = tokio::task::spawn_blocking(move || Cluster::try_start(n, 0))
            .await
            .map_err(|e| Failure::usage(e.to_string()))?
            .map_err(Failure::usage)?;
        backend.redis_url = None;
        backend.cluster = cluster.urls();
        _cluster = Some(cluster);
    } else if !backend.is_given() {
        return Err(Failure::usage(
            "give --spawn-redis, --spawn-cluster N, --spawn-postgres, --redis-url URL, --cluster, --sentinel, --redlock or --postgres-url",
        ));
    }
    let spawned = _single.is_some() || _cluster.is_some();
    if !backend.is_single()
        && (args.baseline || matches!(args.workload, Workload::Mem | Workload::Waiters))
    {
        return Err(Failure::usage(
            "mem, waiters and --baseline measure one server: use --redis-url or --spawn-redis",
        ));
    }
    let mut nodes = Nodes::connect(&backend).await?;
    let size = nodes.dbsize().await;
    if size > 0 && !args.flush && !spawned {
        return Err(Failure::usage(format!(
            "the servers hold {size} keys; bench flushes them before each run: pass --flush to allow it, or use --spawn-redis"
        )));
    }
    let url = backend.redis_url.clone().unwrap_or_default();
    let mut results = Vec::new();
    for _ in 0..args.runs.max(1) {
        nodes.flush().await?;
        let run = match args.workload {
            Workload::W1 => contended(&args, &backend, &mut nodes, Shape::OwnKey).await?,
            Workload::W2 => contended(&args, &backend, &mut nodes, Shape::OneKey).await?,
            Workload::W3 => contended(&args, &backend, &mut nodes, Shape::ThreeOf100).await?,
            Workload::Mem => memory::memory(&args, &url, &mut nodes.admins[0].1).await?,
            Workload::Waiters => waiters::waiters(&args, &url).await?,
        };
        println!("{run}");
        results.push(run);
    }
    if results.len() > 1 {
        println!("{}", medians(&results));
    }
    Ok(EXIT_OK)
}

/// One run of w1-w3: lockstep, then with `--baseline` the bare lock on
/// the same server (flushed in between), and `vs_bare`, the ratio of the
/// two rates.
async fn contended(
    args: &BenchArgs,
    backend: &BackendArgs,
    nodes: &mut Nodes,
    shape: Shape,
) -> Result<serde_json::Value, Failure> {
    let (subject, kind) = contention::subject(args, backend, nodes, false).await?;
    let mut run = contention::contention(args, backend, nodes, shape, subject, kind).await?;
    if args.baseline {
        nodes.flush().await?;
        let (bare, kind) = contention::subject(args, backend, nodes, true).await?;
        let bare = contention::contention(args, backend, nodes, shape, bare, kind).await?;
        let rate = |r: &serde_json::Value| {
            r["results"]["pairs_per_s"]
                .as_f64()
                .or(r["results"]["acq_per_s"].as_f64())
                .unwrap_or(0.0)
        };
        let vs_bare = if rate(&bare) > 0.0 {
            stats::round2(rate(&run) / rate(&bare))
        } else {
            0.0
        };
        run["results"]["vs_bare"] = serde_json::json!(vs_bare);
        run["results"]["bare"] = bare["results"].clone();
    }
    Ok(run)
}

/// The bench's provider settings.
pub(super) fn tune(config: RedisConfig, args: &BenchArgs, pool_size: usize) -> RedisConfig {
    config
        .namespace("bench:")
        .pool_size(pool_size)
        .fair(!args.barging)
        .notifications(!args.no_notifications)
        .functions(!args.no_functions)
}

pub(super) async fn connect(
    args: &BenchArgs,
    url: &str,
    pool_size: usize,
) -> Result<RedisProvider, Failure> {
    connect_with(url, pool_size, !args.barging, !args.no_notifications).await
}

pub(super) async fn connect_with(
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
