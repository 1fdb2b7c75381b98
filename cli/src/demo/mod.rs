//! `lockstep demo`: many instances charge the same orders; the locks keep
//! every order charged once. Also the `worker` it starts as separate
//! processes, and `report` for a run made by other means (docker compose).

use std::io::IsTerminal;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lockstep::LockingModule;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

use crate::backend::{BackendArgs, Connected};
use crate::failure::{EXIT_OK, EXIT_USAGE, EXIT_WRONG, Failure};
mod checkout;
mod pg_ledger;

use checkout::{InstanceStats, Ledger, Plan, order_id, run_instance};
use pg_ledger::PgLedger;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Instances charging orders at once (tasks, or processes with a
    /// server).
    #[arg(long, default_value_t = 4)]
    instances: usize,
    /// Orders to charge.
    #[arg(long, default_value_t = 200)]
    orders: usize,
    /// Instances attempting each order at about the same time.
    #[arg(long, default_value_t = 3)]
    attempts_per_order: usize,
    /// Lock in Redis (one server, a cluster, Sentinel or Redlock) or
    /// PostgreSQL: the instances become separate processes. Default:
    /// in-memory, instances as tasks.
    #[command(flatten)]
    servers: Servers,
    /// Run without locks, to see the race.
    #[arg(long)]
    no_lock: bool,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// The payment provider's latency in ms: the charge step's racy window.
    #[arg(long, default_value_t = 3)]
    charge_ms: u64,
    /// Decline the first charge of every n-th order (0: never), so that
    /// compensation releases its lock.
    #[arg(long, default_value_t = 10)]
    decline_every: usize,
    /// acquire_lock_step timeout, ms.
    #[arg(long, default_value_t = 2000)]
    lock_timeout_ms: u64,
    /// acquire_lock_step ttl, ms.
    #[arg(long, default_value_t = 10_000)]
    ttl_ms: u64,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while the demo
    /// runs. Only this process's: with a server, the worker processes'
    /// locks are not included.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Keep serving metrics this long (ms) after the demo ends.
    #[arg(long, default_value_t = 0, hide = true)]
    metrics_linger_ms: u64,
}

impl DemoArgs {
    fn plan(&self) -> Result<Plan, Failure> {
        if self.instances == 0 || self.orders == 0 || self.attempts_per_order == 0 {
            return Err(Failure::usage(
                "--instances, --orders and --attempts-per-order must be at least 1",
            ));
        }
        if self.instances > 64 && self.servers.backend.is_given() {
            return Err(Failure::usage(
                "at most 64 instances (processes) with a server",
            ));
        }
        if self.lock_timeout_ms == 0 || self.ttl_ms == 0 {
            return Err(Failure::usage(
                "--lock-timeout-ms and --ttl-ms must be above 0",
            ));
        }
        Ok(Plan {
            instances: self.instances,
            orders: self.orders,
            attempts_per_order: self.attempts_per_order,
            lock: !self.no_lock,
            charge_ms: self.charge_ms,
            decline_every: self.decline_every,
            lock_timeout_ms: self.lock_timeout_ms,
            ttl_ms: self.ttl_ms,
        })
    }
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    provider: String,
    mode: &'static str,
    locking: bool,
    instances: usize,
    orders: usize,
    attempts_per_order: usize,
    attempts: u64,
    charges: u64,
    charged_orders: usize,
    double_charges: usize,
    uncharged_orders: usize,
    already_charged: u64,
    lock_timeouts: u64,
    declines: u64,
    compensations: u64,
    errors: u64,
    lock_wait_p50_us: Option<u64>,
    lock_wait_p99_us: Option<u64>,
    lock_wait_max_us: Option<u64>,
    elapsed_ms: u64,
}

pub(crate) async fn demo(args: DemoArgs) -> Result<u8, Failure> {
    let plan = args.plan()?;
    if let Some(addr) = args.metrics_addr {
        crate::metrics::serve(addr).await?;
    }
    let started = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let display = Progress::start(Arc::clone(&progress), plan.total_attempts() as u64);
    let outcome = if args.servers.backend.is_given() {
        in_processes(&plan, &args.servers, Arc::clone(&progress)).await
    } else {
        in_tasks(&plan, Arc::clone(&progress)).await
    };
    display.stop();
    let (provider, mode, stats, charges) = outcome?;
    let report = report(&plan, provider, mode, stats, &charges, started.elapsed());
    print_report(&report, args.json);
    if args.metrics_addr.is_some() && args.metrics_linger_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.metrics_linger_ms)).await;
    }
    Ok(exit_status(&report))
}

fn exit_status(r: &Report) -> u8 {
    if !r.locking {
        // Double charges are what --no-lock is there to show.
        EXIT_OK
    } else if r.double_charges > 0 || r.uncharged_orders > 0 || r.errors > 0 {
        EXIT_WRONG
    } else {
        EXIT_OK
    }
}

type Outcome = (
    String,
    &'static str,
    InstanceStats,
    std::collections::HashMap<String, u64>,
);

/// Instances as tasks of this process, on the in-memory provider.
async fn in_tasks(plan: &Plan, progress: Arc<AtomicU64>) -> Result<Outcome, Failure> {
    let locking = LockingModule::new();
    let ledger = Ledger::memory();
    let mut tasks = Vec::new();
    for i in 0..plan.instances {
        let (plan, locking, ledger, progress) = (
            plan.clone(),
            locking.clone(),
            ledger.clone(),
            Arc::clone(&progress),
        );
        tasks.push(tokio::spawn(async move {
            run_instance(&plan, i, locking, ledger, progress).await
        }));
    }
    let mut stats = InstanceStats::default();
    for t in tasks {
        stats.merge(t.await.map_err(|e| Failure {
            status: EXIT_WRONG,
            message: format!("an instance panicked: {e}"),
        })?);
    }
    let charges = ledger.charges().await.unwrap_or_default();
    Ok(("in-memory".into(), "tasks", stats, charges))
}

/// Where a demo run's locks and ledger live.
#[derive(Debug, clap::Args)]
pub(crate) struct Servers {
    #[command(flatten)]
    backend: BackendArgs,
    /// The ledger's Redis (the payment provider's record of charges).
    /// Default: the --redis-url server, or with --postgres-url the table
    /// `demo_ledger` in the --pg-schema schema of the same database;
    /// required with --cluster, --sentinel and --redlock, so that no
    /// failover of the lock servers can rewrite the record the demo is
    /// judged by.
    #[arg(long, value_name = "URL")]
    ledger_url: Option<String>,
}

/// Where a run's ledger is kept.
enum LedgerAt {
    /// Two hashes per run in this Redis.
    Redis(String),
    /// Rows keyed by the run in `<schema>.demo_ledger` of this database.
    Postgres { url: String, schema: String },
}

impl Servers {
    /// The ledger's place: `--ledger-url`, else the one server locks live
    /// on (a Redis, or PostgreSQL).
    fn ledger_at(&self) -> Result<LedgerAt, Failure> {
        let backend = &self.backend;
        match (&self.ledger_url, &backend.redis_url, &backend.postgres_url) {
            (Some(url), _, _) => Ok(LedgerAt::Redis(url.clone())),
            (None, Some(url), _) if backend.is_single() => Ok(LedgerAt::Redis(url.clone())),
            (None, None, Some(url)) => Ok(LedgerAt::Postgres {
                url: url.clone(),
                schema: backend.pg_schema.clone(),
            }),
            _ => Err(Failure::usage(
                "give --ledger-url: with --cluster, --sentinel or --redlock the ledger lives on a plain Redis of its own",
            )),
        }
    }

    /// The ledger of demo run `run`, with exit status 2 on failure.
    async fn ledger(&self, run: &str) -> Result<Ledger, Failure> {
        match self.ledger_at()? {
            LedgerAt::Redis(url) => {
                let conn = crate::backend::plain(&url)
                    .await
                    .map_err(|e| Failure::usage(format!("cannot reach the ledger's Redis: {e}")))?;
                Ok(Ledger::redis(conn, &self.backend.namespace, run))
            }
            LedgerAt::Postgres { url, schema } => PgLedger::connect(&url, &schema, run)
                .await
                .map(Ledger::Postgres)
                .map_err(|e| Failure::usage(format!("cannot set up the ledger's table: {e}"))),
        }
    }

    /// The locks, then the ledger of run `run`, with exit status 2 on
    /// failure (a missing --ledger-url before anything connects). The locks
    /// first: on PostgreSQL, the provider creates the schema the ledger's
    /// table goes in.
    async fn connect(&self, run: &str) -> Result<(Connected, Ledger), Failure> {
        self.ledger_at()?;
        let connected = self.backend.connect().await.map_err(Failure::usage)?;
        Ok((connected, self.ledger(run).await?))
    }

    /// The same flags, for a worker process.
    fn to_args(&self) -> Result<Vec<String>, Failure> {
        let mut args = self.backend.to_args();
        if let LedgerAt::Redis(url) = self.ledger_at()? {
            args.extend(["--ledger-url".to_owned(), url]);
        }
        Ok(args)
    }
}

/// Instances as worker processes sharing one server (Redis or PostgreSQL).
async fn in_processes(
    plan: &Plan,
    servers: &Servers,
    progress: Arc<AtomicU64>,
) -> Result<Outcome, Failure> {
    let run = format!("{:x}", rand_u64());
    let (connected, ledger) = servers.connect(&run).await?;
    let worker_args = servers.to_args()?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::usage(format!("cannot find my own binary: {e}")))?;
    let plan_json = serde_json::to_string(plan).expect("a plan serializes");
    let mut workers = Vec::new();
    for i in 0..plan.instances {
        let mut child = tokio::process::Command::new(&exe)
            .arg("worker")
            .args(&worker_args)
            .args(["--run", &run])
            .args(["--instance", &i.to_string(), "--plan", &plan_json])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::usage(format!("cannot start a worker: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        workers.push((child, stdin, lines));
    }
    // Every worker connects first; then all start at once, so that the
    // same orders are attempted at the same time.
    for (i, (_, _, lines)) in workers.iter_mut().enumerate() {
        match lines.next_line().await {
            Ok(Some(l)) if l == "ready" => {}
            other => {
                return Err(Failure {
                    status: EXIT_USAGE,
                    message: format!("worker {i} did not start: {other:?}"),
                });
            }
        }
    }
    for (_, stdin, _) in workers.iter_mut() {
        let _ = stdin.write_all(b"go\n").await;
        let _ = stdin.flush().await;
    }
    let mut handles = Vec::new();
    for (i, (mut child, _stdin, mut lines)) in workers.into_iter().enumerate() {
        let progress = Arc::clone(&progress);
        handles.push(tokio::spawn(async move {
            let mut last = 0u64;
            let mut stats = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(n) = line.strip_prefix("progress ") {
                    let n: u64 = n.parse().unwrap_or(last);
                    progress.fetch_add(n.saturating_sub(last), Ordering::Relaxed);
                    last = n;
                } else if let Some(json) = line.strip_prefix("stats ") {
                    stats = serde_json::from_str::<InstanceStats>(json).ok();
                }
            }
            let status = child.wait().await;
            match (stats, status) {
                (Some(s), Ok(st)) if st.success() => Ok(s),
                (_, st) => Err(format!("worker {i} failed ({st:?})")),
            }
        }));
    }
    let mut stats = InstanceStats::default();
    for h in handles {
        let s = h
            .await
            .map_err(|e| Failure::usage(e.to_string()))?
            .map_err(|m| Failure {
                status: EXIT_WRONG,
                message: m,
            })?;
        stats.merge(s);
    }
    let charges = ledger
        .charges()
        .await
        .map_err(|e| Failure::usage(format!("cannot read the ledger: {e}")))?;
    ledger.clear().await;
    connected.module.shutdown().await;
    Ok((connected.kind.into(), "processes", stats, charges))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    servers: Servers,
    /// The demo run this worker belongs to (names the ledger).
    #[arg(long)]
    run: String,
    /// This worker's index, from 0.
    #[arg(long)]
    instance: usize,
    /// The plan, as JSON (what `demo` passes), or the flags below.
    #[arg(long)]
    plan: Option<String>,
    #[arg(long, default_value_t = 3)]
    instances: usize,
    #[arg(long, default_value_t = 200)]
    orders: usize,
    #[arg(long, default_value_t = 3)]
    attempts_per_order: usize,
    #[arg(long)]
    no_lock: bool,
    /// Start at once instead of waiting for "go" on stdin.
    #[arg(long)]
    start_now: bool,
}

/// One instance as its own process: connects, says "ready", waits for "go",
/// runs its attempts, reports progress and its stats on stdout.
pub(crate) async fn worker(args: WorkerArgs) -> Result<u8, Failure> {
    let plan: Plan = match &args.plan {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| Failure::usage(format!("bad --plan: {e}")))?
        }
        None => Plan {
            instances: args.instances,
            orders: args.orders,
            attempts_per_order: args.attempts_per_order,
            lock: !args.no_lock,
            charge_ms: 3,
            decline_every: 10,
            lock_timeout_ms: 2000,
            ttl_ms: 10_000,
        },
    };
    if args.instance >= plan.instances {
        return Err(Failure::usage("--instance must be below --instances"));
    }
    let (connected, ledger) = args.servers.connect(&args.run).await?;
    let locking = connected.module;
    if !args.start_now {
        println!("ready");
        let mut go = String::new();
        let mut stdin = BufReader::new(tokio::io::stdin());
        stdin
            .read_line(&mut go)
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
    }
    let progress = Arc::new(AtomicU64::new(0));
    let reporter = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                println!("progress {}", progress.load(Ordering::Relaxed));
            }
        })
    };
    let stats = run_instance(
        &plan,
        args.instance,
        locking.clone(),
        ledger,
        Arc::clone(&progress),
    )
    .await;
    reporter.abort();
    println!("progress {}", progress.load(Ordering::Relaxed));
    println!(
        "stats {}",
        serde_json::to_string(&stats).expect("stats serialize")
    );
    locking.shutdown().await;
    Ok(EXIT_OK)
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReportArgs {
    #[command(flatten)]
    servers: Servers,
    /// The demo run to report on.
    #[arg(long)]
    run: String,
    /// How many orders the run had.
    #[arg(long, default_value_t = 200)]
    orders: usize,
    #[arg(long)]
    json: bool,
}

/// Reads the ledger of a run made by standalone workers.
pub(crate) async fn report_run(args: ReportArgs) -> Result<u8, Failure> {
    let ledger = args.servers.ledger(&args.run).await?;
    let charges = ledger
        .charges()
        .await
        .map_err(|e| Failure::usage(format!("cannot read the ledger: {e}")))?;
    let double = charges.values().filter(|n| **n > 1).count();
    let uncharged = (0..args.orders)
        .filter(|k| !charges.contains_key(&order_id(*k)))
        .count();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"run": args.run, "orders": args.orders, "charged_orders": charges.len(),
                "charges": charges.values().sum::<u64>(), "double_charges": double, "uncharged_orders": uncharged})
        );
    } else {
        println!(
            "run {}: {} of {} orders charged, {double} charged more than once, {uncharged} not charged",
            args.run,
            charges.len(),
            args.orders
        );
    }
    Ok(if double > 0 || uncharged > 0 {
        EXIT_WRONG
    } else {
        EXIT_OK
    })
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn report(
    plan: &Plan,
    provider: String,
    mode: &'static str,
    mut stats: InstanceStats,
    charges: &std::collections::HashMap<String, u64>,
    elapsed: Duration,
) -> Report {
    stats.lock_waits_us.sort_unstable();
    let uncharged = (0..plan.orders)
        .filter(|k| !charges.contains_key(&order_id(*k)))
        .count();
    Report {
        provider,
        mode,
        locking: plan.lock,
        instances: plan.instances,
        orders: plan.orders,
        attempts_per_order: plan.attempts_per_order,
        attempts: stats.attempts,
        charges: charges.values().sum(),
        charged_orders: charges.len(),
        double_charges: charges.values().filter(|n| **n > 1).count(),
        uncharged_orders: uncharged,
        already_charged: stats.already_charged,
        lock_timeouts: stats.lock_timeouts,
        declines: stats.declines,
        compensations: stats.compensations,
        errors: stats.errors,
        lock_wait_p50_us: percentile(&stats.lock_waits_us, 50.0),
        lock_wait_p99_us: percentile(&stats.lock_waits_us, 99.0),
        lock_wait_max_us: stats.lock_waits_us.last().copied(),
        elapsed_ms: elapsed.as_millis() as u64,
    }
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("a report serializes"));
        return;
    }
    let us = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{:.1} ms", v as f64 / 1000.0));
    println!(
        "checkout demo: {} instances ({}, {}), {} orders x {} attempts, {}",
        r.instances,
        r.mode,
        r.provider,
        r.orders,
        r.attempts_per_order,
        if r.locking {
            "with locks"
        } else {
            "WITHOUT locks"
        }
    );
    println!(
        "  {} attempts in {:.2} s: {} charges, {} skipped as already charged, {} declined (compensated: {} steps)",
        r.attempts,
        r.elapsed_ms as f64 / 1000.0,
        r.charges,
        r.already_charged,
        r.declines,
        r.compensations
    );
    if r.locking {
        println!(
            "  lock waits: p50 {}, p99 {}, max {}; {} lock timeouts",
            us(r.lock_wait_p50_us),
            us(r.lock_wait_p99_us),
            us(r.lock_wait_max_us),
            r.lock_timeouts
        );
    }
    let verdict = match (r.double_charges, r.uncharged_orders) {
        (0, 0) => "every order charged exactly once".to_owned(),
        (d, u) => format!("{d} orders charged more than once, {u} orders not charged"),
    };
    println!("  result: {verdict}");
    if !r.locking && r.double_charges > 0 {
        println!("  (run it without --no-lock to see the locks prevent this)");
    }
}

/// A progress line on stderr: redrawn in place on a terminal, a line per
/// second otherwise.
struct Progress {
    task: tokio::task::JoinHandle<()>,
    tty: bool,
}

impl Progress {
    fn start(done: Arc<AtomicU64>, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let period = if tty {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let n = done.load(Ordering::Relaxed);
                if tty {
                    eprint!(
                        "\r  {n}/{total} attempts ({:.0}%)",
                        n as f64 * 100.0 / total as f64
                    );
                } else {
                    eprintln!("  {n}/{total} attempts");
                }
            }
        });
        Progress { task, tty }
    }

    fn stop(self) {
        self.task.abort();
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}
