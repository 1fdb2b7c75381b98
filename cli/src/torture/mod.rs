//! `lockstep torture`: a checkout-style workload from several processes
//! against redis-servers this command starts itself (or the PostgreSQL
//! provider, `pg.rs`), under a schedule of faults, with the guarded data
//! checked by fencing tokens.
//!
//! - Two servers: the lock server (the one faults hit) and the store, which
//!   holds the guarded records (a lock service and the data it guards are
//!   different systems). The lock server persists with `appendfsync always`,
//!   so an acknowledged lock survives a `kill -9`: without persistence a
//!   restart forgets every lock, and two holders at once follow by design
//!   (see docs/failover.md, "Torture").
//! - Workers (`torture-worker` processes) loop over `execute` on a few hot
//!   keys. Inside each job: `begin` (the store records the holder, its token
//!   and when its first lease ends, and counts an overlap if another holder's
//!   lease was still running), two fenced writes, `end`.
//! - Faults, every 0.5-1.5 s: the lock server killed with -9 and restarted;
//!   a worker paused (SIGSTOP) past its lease, then resumed; every client
//!   connection of the lock server cut.
//! - On PostgreSQL (`--spawn-postgres`, `--postgres-url`) the same workers
//!   and checks on the Postgres provider. The store stays a redis-server.
//!   The faults: the server killed with -9 and restarted (a server of
//!   ours only; PostgreSQL keeps every committed row through it), a worker
//!   paused, and `pg_terminate_backend` of every worker's backend.
//! - Violations: an overlap (two holders with running leases), or a write
//!   accepted with a token lower than one accepted before for that record
//!   (audited afterwards from the store's log, independently of the check
//!   that should have refused it).

pub(crate) mod fenced;
pub(crate) mod hold;
mod pg;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockstep::{
    ExecuteOptions, LockError, LockingModule, PostgresConfig, PostgresProvider, RedisConfig,
    RedisProvider,
};
use lockstep_testkit::RedisServer;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::failure::{EXIT_OK, EXIT_WRONG, Failure};

/// The store's side of a critical section, atomic.
///
/// ```text
/// KEYS[1]  `rec:<key>`: a hash with `holder` (token), `until` (ms, when that
///          holder's first lease ends), `token` (highest accepted), `value`
/// KEYS[2]  `log:<key>`: a list of accepted write tokens, for the audit
/// KEYS[3]  `violations`: a hash of counters
/// ARGV[1]  "begin" | "write" | "end"
/// ARGV[2]  the caller's fencing token
/// ARGV[3]  begin: the caller's lease end (ms since the epoch); write: value
/// ARGV[4]  begin: the caller's process id (so faults can pause a holder)
/// ```
/// Returns 1 if done, 0 if refused (a stale token).
const STORE: &str = r"
local rec, log, violations = KEYS[1], KEYS[2], KEYS[3]
local token = tonumber(ARGV[2])
local last = tonumber(redis.call('HGET', rec, 'token') or '0')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'begin' then
  if token < last then
    return 0
  end
  local holder = redis.call('HGET', rec, 'holder')
  local lease_end = tonumber(redis.call('HGET', rec, 'until') or '0')
  if holder and tonumber(holder) ~= token and lease_end > now_ms then
    redis.call('HINCRBY', violations, 'overlap', 1)
  end
  redis.call('HSET', rec, 'holder', ARGV[2], 'until', ARGV[3], 'token', ARGV[2], 'pid', ARGV[4])
  return 1
elseif ARGV[1] == 'write' then
  if token < last then
    redis.call('HINCRBY', violations, 'refused', 1)
    return 0
  end
  redis.call('HSET', rec, 'token', ARGV[2], 'value', ARGV[3])
  redis.call('RPUSH', log, ARGV[2])
  return 1
else
  if redis.call('HGET', rec, 'holder') == ARGV[2] then
    redis.call('HDEL', rec, 'holder', 'until')
  end
  return 1
end
";

#[derive(Debug, clap::Args)]
pub(crate) struct TortureArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// The redis-server binary to start (default: `LOCKSTEP_REDIS_SERVER_BIN`,
    /// else redis-server in PATH).
    #[arg(long)]
    redis_server_bin: Option<PathBuf>,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Hot keys they contend for.
    #[arg(long, default_value_t = 3)]
    keys: usize,
    /// Lease of each execute, ms.
    #[arg(long, default_value_t = 500)]
    lease_ms: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Run the lock server without persistence, so that a restart forgets
    /// every lock: shows that the checker does see two holders at once.
    #[arg(long)]
    no_persistence: bool,
    /// Lock on a PostgreSQL this command starts (initdb in a temporary
    /// directory, a free loopback port), with the Postgres provider:
    /// faults are its restarts (kill -9), paused holders and
    /// `pg_terminate_backend` of the workers' connections. The store stays
    /// a redis-server.
    #[arg(long, conflicts_with_all = ["postgres_url", "no_persistence"])]
    spawn_postgres: bool,
    /// Lock on this PostgreSQL, e.g. postgres://user@host/db, in a schema
    /// `lockstep_torture_<run>` created for the run and dropped after it:
    /// as --spawn-postgres, without restarts (a server not ours is never
    /// restarted).
    #[arg(long, value_name = "URL", conflicts_with = "no_persistence")]
    postgres_url: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while it runs.
    /// Only this process's: the workers, which take the locks, are other
    /// processes and are not included.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct TortureWorkerArgs {
    #[arg(long, required_unless_present = "postgres_url")]
    redis_url: Option<String>,
    #[arg(long, conflicts_with = "redis_url")]
    postgres_url: Option<String>,
    #[arg(long, default_value = lockstep::DEFAULT_SCHEMA)]
    pg_schema: String,
    #[arg(long)]
    store_url: String,
    #[arg(long)]
    keys: usize,
    #[arg(long)]
    lease_ms: u64,
    #[arg(long)]
    duration: f64,
    #[arg(long)]
    seed: u64,
}

/// What a worker reports.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerStats {
    operations: u64,
    lost_leases: u64,
    refused_writes: u64,
    errors: HashMap<String, u64>,
}

/// A redis-server of this command's (the test kit's launcher), with AOF
/// and `fsync` on every write unless `persist` is false.
fn start_server(persist: bool) -> Result<RedisServer, Failure> {
    let persistence: &[&str] = if persist {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &[]
    };
    RedisServer::try_start_with(None, None, persistence).map_err(Failure::usage)
}

/// A connection to `server`.
async fn connection(
    server: &RedisServer,
) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
    redis::Client::open(server.url())?
        .get_multiplexed_async_connection()
        .await
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// The server the locks live on: the one the faults hit.
enum LockServer {
    Redis(RedisServer),
    Postgres(pg::PgLocks),
}

impl LockServer {
    /// The provider the workers use, for the report.
    fn provider(&self) -> &'static str {
        match self {
            LockServer::Redis(_) => "locking-redis",
            LockServer::Postgres(_) => "locking-postgres",
        }
    }

    /// The flags that point a worker at it.
    fn worker_args(&self) -> Result<Vec<String>, Failure> {
        match self {
            LockServer::Redis(server) => Ok(vec!["--redis-url".to_owned(), server.url()]),
            LockServer::Postgres(locks) => locks.worker_args().map_err(Failure::usage),
        }
    }

    /// Whether it is ours to kill and restart.
    fn can_restart(&self) -> bool {
        match self {
            LockServer::Redis(_) => true,
            LockServer::Postgres(locks) => locks.server.is_some(),
        }
    }

    /// kill -9, then the same port and data directory again: the fault's
    /// name.
    fn restart(&mut self) -> Result<&'static str, Failure> {
        tokio::task::block_in_place(|| match self {
            LockServer::Redis(server) => server.try_restart().map(|()| "redis_restarts"),
            LockServer::Postgres(locks) => match &mut locks.server {
                Some(server) => server.try_restart().map(|()| "postgres_restarts"),
                None => Err("a PostgreSQL given by URL is not restarted".to_owned()),
            },
        })
        .map_err(Failure::usage)
    }

    /// Cuts the workers' connections: how many were cut.
    async fn cut_connections(&self) -> u64 {
        match self {
            LockServer::Redis(server) => {
                let mut cut = 0;
                if let Ok(mut c) = connection(server).await {
                    for kind in ["normal", "pubsub"] {
                        let n: Result<u64, _> = redis::cmd("CLIENT")
                            .arg(&["KILL", "TYPE", kind])
                            .query_async(&mut c)
                            .await;
                        cut += n.unwrap_or(0);
                    }
                }
                // Not our own connection: CLIENT KILL skips the caller.
                cut
            }
            LockServer::Postgres(locks) => locks.terminate_workers().await.unwrap_or_else(|e| {
                eprintln!("torture: pg_terminate_backend failed: {e}");
                0
            }),
        }
    }
}

/// A run id: lowercase hex (a schema name may carry it).
fn run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

pub(crate) async fn torture(args: TortureArgs) -> Result<u8, Failure> {
    if args.workers == 0 || args.keys == 0 || args.lease_ms < 100 {
        return Err(Failure::usage(
            "--workers and --keys must be at least 1, --lease-ms at least 100",
        ));
    }
    if let Some(addr) = args.metrics_addr {
        crate::metrics::serve(addr).await?;
    }
    if let Some(bin) = &args.redis_server_bin {
        lockstep_testkit::set_server_bin(bin);
    }
    let run = run_id();
    let mut locks = if args.spawn_postgres {
        LockServer::Postgres(
            tokio::task::block_in_place(|| pg::PgLocks::spawn(&run)).map_err(Failure::usage)?,
        )
    } else if let Some(url) = &args.postgres_url {
        LockServer::Postgres(
            pg::PgLocks::shared(url, &run)
                .await
                .map_err(Failure::usage)?,
        )
    } else {
        LockServer::Redis(start_server(!args.no_persistence)?)
    };
    let outcome = torture_on(&args, &mut locks).await;
    if let LockServer::Postgres(pg) = &locks
        && let Err(e) = pg.drop_schema().await
    {
        eprintln!("torture: {e}");
    }
    outcome
}

/// The run proper, on `locks`.
async fn torture_on(args: &TortureArgs, locks: &mut LockServer) -> Result<u8, Failure> {
    let started = Instant::now();
    let store = start_server(false)?;
    let exe = std::env::current_exe().map_err(|e| Failure::usage(e.to_string()))?;
    let lock_args = locks.worker_args()?;
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let mut child = tokio::process::Command::new(&exe)
            .arg("torture-worker")
            .args(&lock_args)
            .args(["--store-url", &store.url()])
            .args([
                "--keys",
                &args.keys.to_string(),
                "--lease-ms",
                &args.lease_ms.to_string(),
            ])
            .args([
                "--duration",
                &args.duration.to_string(),
                "--seed",
                &(i as u64 + 1).to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::usage(format!("cannot start a worker: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        workers.push((child, pid, lines));
    }
    // Every worker is connected before the first fault.
    for (i, (_, _, lines)) in workers.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "ready" => {}
            other => {
                return Err(Failure::usage(format!(
                    "torture worker {i} did not start: {other:?}"
                )));
            }
        }
    }

    // The fault schedule.
    let mut faults: HashMap<&'static str, u64> = HashMap::new();
    let mut connections_cut = 0u64;
    let end = started + Duration::from_secs_f64(args.duration);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Without restarts (a PostgreSQL not ours): the other two faults.
    let (kinds, first) = if locks.can_restart() { (3, 0) } else { (2, 1) };
    // Let the workers get going first.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    while Instant::now() + Duration::from_millis(2000) < end {
        tokio::time::sleep(Duration::from_millis(500 + next() % 1000)).await;
        match first + next() % kinds {
            0 => {
                *faults.entry(locks.restart()?).or_default() += 1;
            }
            1 => {
                // Pause whoever holds a key right now, past its lease.
                let key = next() % args.keys as u64;
                let holder: Option<u32> = match connection(&store).await {
                    Ok(mut c) => c
                        .hget(format!("rec:key-{key}"), "pid")
                        .await
                        .unwrap_or(None),
                    Err(_) => None,
                };
                let pid = holder
                    .filter(|p| workers.iter().any(|(_, w, _)| w == p))
                    .unwrap_or(workers[(next() % workers.len() as u64) as usize].1);
                signal(pid, "STOP");
                tokio::time::sleep(Duration::from_millis(args.lease_ms + 300)).await;
                signal(pid, "CONT");
                *faults.entry("paused_holders").or_default() += 1;
            }
            _ => {
                connections_cut += locks.cut_connections().await;
                *faults.entry("dropped_connections").or_default() += 1;
            }
        }
    }

    let mut totals = WorkerStats::default();
    for (mut child, _, mut lines) in workers {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(json) = line.strip_prefix("stats ")
                && let Ok(s) = serde_json::from_str::<WorkerStats>(json)
            {
                totals.operations += s.operations;
                totals.lost_leases += s.lost_leases;
                totals.refused_writes += s.refused_writes;
                for (k, v) in s.errors {
                    *totals.errors.entry(k).or_default() += v;
                }
            }
        }
        let _ = child.wait().await;
    }

    // The audit.
    let mut c = connection(&store)
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    let overlaps: u64 = c.hget("violations", "overlap").await.unwrap_or(0);
    let refused: u64 = c.hget("violations", "refused").await.unwrap_or(0);
    let mut stale_accepted = 0u64;
    for k in 0..args.keys {
        let log: Vec<u64> = c
            .lrange(format!("log:key-{k}"), 0, -1)
            .await
            .unwrap_or_default();
        stale_accepted += log.windows(2).filter(|w| w[1] < w[0]).count() as u64;
    }
    let violations = overlaps + stale_accepted;
    let persistence = match locks {
        LockServer::Redis(_) => !args.no_persistence,
        // Every commit is written before it is acknowledged (the test
        // kit's server: synchronous_commit on), and a kill -9 of the
        // server loses nothing the kernel has.
        LockServer::Postgres(_) => true,
    };
    let pg_schema = match locks {
        LockServer::Postgres(pg) => Some(pg.schema.clone()),
        LockServer::Redis(_) => None,
    };
    let report = json!({
        "provider": locks.provider(),
        "pg_schema": pg_schema,
        "operations": totals.operations,
        "violations": violations,
        "violations_by_kind": {"two_holders_at_once": overlaps, "stale_writes_accepted": stale_accepted},
        "lost_leases": totals.lost_leases,
        "stale_writes_refused": refused,
        "errors": totals.errors,
        "faults_injected": faults.values().sum::<u64>(),
        "faults_by_kind": faults,
        "connections_cut": connections_cut,
        "workers": args.workers, "keys": args.keys, "lease_ms": args.lease_ms,
        "lock_server_persistence": persistence,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "torture ({}): {} operations by {} workers on {} keys in {:.1} s; faults injected: {} ({connections_cut} connections cut)",
            locks.provider(),
            totals.operations,
            args.workers,
            args.keys,
            started.elapsed().as_secs_f64(),
            report["faults_by_kind"]
        );
        println!(
            "  {} leases lost (detected), {} stale writes refused by the fenced store, errors: {}",
            totals.lost_leases, refused, report["errors"]
        );
        println!(
            "  violations: {violations} ({overlaps} two holders at once, {stale_accepted} stale writes accepted)"
        );
    }
    Ok(if violations > 0 { EXIT_WRONG } else { EXIT_OK })
}

fn wall_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let wall = if at >= now {
        wall + (at - now)
    } else {
        wall.saturating_sub(now - at)
    };
    wall.as_millis() as u64
}

/// One worker: `execute` on random hot keys until the time is up.
pub(crate) async fn torture_worker(args: TortureWorkerArgs) -> Result<u8, Failure> {
    let locking = LockingModule::builder();
    let locking = match (&args.postgres_url, &args.redis_url) {
        (Some(url), _) => {
            // A statement may wait behind another worker's advisory locks on
            // a loaded machine: 1 s on the server (2 s on the client) before
            // it counts as unanswered.
            let config = PostgresConfig::from_url(url)
                .schema(&args.pg_schema)
                .connect_timeout(Duration::from_millis(500))
                .statement_timeout(Duration::from_secs(1))
                .pool_size(4);
            let provider = PostgresProvider::connect(config)
                .await
                .map_err(|e| Failure::usage(e.to_string()))?;
            locking.provider("locking-postgres", provider)
        }
        (None, Some(url)) => {
            let config = RedisConfig::from_url(url)
                .namespace("torture:")
                .connect_timeout(Duration::from_millis(500))
                .response_timeout(Duration::from_millis(300));
            let provider = RedisProvider::connect(config)
                .await
                .map_err(|e| Failure::usage(e.to_string()))?;
            locking.provider("locking-redis", provider)
        }
        (None, None) => return Err(Failure::usage("give --redis-url or --postgres-url")),
    }
    .build()
    .expect("one provider");
    let store = redis::Client::open(args.store_url.as_str())
        .map_err(|e| Failure::usage(e.to_string()))?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    let script = redis::Script::new(STORE);
    println!("ready");
    let mut stats = WorkerStats::default();
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut rng = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while Instant::now() < end {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = format!("key-{}", rng % args.keys as u64);
        let (store, script) = (store.clone(), &script);
        let record = (format!("rec:{key}"), format!("log:{key}"));
        let result = locking
            .execute(
                key.as_str(),
                ExecuteOptions::new()
                    .expire(Duration::from_millis(args.lease_ms))
                    .timeout(Duration::from_secs(2)),
                |held| async move {
                    let token = held.fencing_token();
                    let call = |op: &'static str, arg: String| {
                        let mut store = store.clone();
                        let record = record.clone();
                        async move {
                            script
                                .key(&record.0)
                                .key(&record.1)
                                .key("violations")
                                .arg(op)
                                .arg(token)
                                .arg(arg)
                                .arg(std::process::id())
                                .invoke_async::<i64>(&mut store)
                                .await
                        }
                    };
                    let mut refused = 0;
                    match call("begin", wall_ms(held.first_lease_ends()).to_string()).await {
                        Ok(1) => {}
                        Ok(_) => return Ok(refused + 1),
                        Err(e) => return Err(e),
                    }
                    for step in 0..2 {
                        if call("write", format!("{token}/{step}")).await? != 1 {
                            refused += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    call("end", String::new()).await?;
                    Ok(refused)
                },
            )
            .await;
        match result {
            Ok(Ok(refused)) => {
                stats.operations += 1;
                stats.refused_writes += refused;
            }
            Ok(Err(store_error)) => {
                eprintln!("torture-worker: the store failed: {store_error}");
                *stats.errors.entry("store".to_owned()).or_default() += 1;
            }
            Err(LockError::LeaseLost { .. }) => stats.lost_leases += 1,
            Err(e) => {
                let kind = match &e {
                    LockError::TimedOut { .. } | LockError::Contended { .. } => {
                        "timed_out".to_owned()
                    }
                    LockError::Backend(b) => format!("backend_{:?}", b.kind()).to_lowercase(),
                    other => format!("{other:?}")
                        .split_whitespace()
                        .next()
                        .unwrap_or("other")
                        .to_lowercase(),
                };
                *stats.errors.entry(kind).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    println!(
        "stats {}",
        serde_json::to_string(&stats).expect("stats serialize")
    );
    locking.shutdown().await;
    Ok(EXIT_OK)
}
