//! The `lockstep` command line: a crate of its own, so that programs using
//! the library do not compile argument parsing, JSON output or the test
//! kit's server launcher.
//!
//! # Layout
//!
//! - `main.rs`: the commands, `check` and `release-all`.
//! - `locks.rs`: `locks list | show | force-release` (inspection).
//! - `run.rs`: `run`, a command run under a lock (like `flock(1)` across
//!   machines), its exit statuses and the duration flags' parser.
//! - `failure.rs`: exit statuses and the one result type of every command.
//! - `backend.rs`: the flags that pick a backend (`--redis-url`,
//!   `--cluster`, `--sentinel`, `--redlock`, `--postgres-url`) and
//!   connecting to it.
//! - `demo/`: the checkout demo (`mod.rs`: demo, worker, report;
//!   `checkout.rs`: the workflow and the ledger; `pg_ledger.rs`: the
//!   ledger as a PostgreSQL table).
//! - `torture/`: faults against real servers (`mod.rs`: torture and its
//!   workers; `pg.rs`: its PostgreSQL lock server and faults; `hold.rs`:
//!   one holder as a process; `fenced.rs`: the fenced store that checks).
//! - `bench/`: measurements (`contention.rs`: w1-w3; `memory.rs`;
//!   `waiters.rs`; `baseline.rs`; `stats.rs`).
//!
//! Three subcommands are internal, hidden from `--help`: `worker` (one demo
//! instance, started by `demo`), `torture-worker` (started by `torture`) and
//! `hold` (a lock holder for fault-injection tests). They are not meant to
//! be run by hand and may change without notice.

mod backend;
mod bench;
mod demo;
mod failure;
mod locks;
mod metrics;
mod run;
mod torture;

use std::process::ExitCode;
use std::time::Duration;

use backend::BackendArgs;
use clap::{Parser, Subcommand};
use failure::{CommandResult, EXIT_OK, Failure};
use lockstep::ReleaseOptions;

/// Distributed locks for workflows, backed by Redis.
#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The checkout demo: instances charge the same orders at once; the
    /// locks keep every order charged exactly once. Exit status 0 when every
    /// order is charged once, 1 on a double (or missing) charge, 2 on bad
    /// usage or an unreachable server.
    Demo(demo::DemoArgs),
    /// Internal: one demo instance as a process (started by `demo
    /// --redis-url` or `--postgres-url`, or by docker compose with
    /// --start-now).
    #[command(hide = true)]
    Worker(demo::WorkerArgs),
    /// Report on a demo run made by standalone workers (docker compose).
    Report(demo::ReportArgs),
    /// A checkout-style workload from several processes under injected
    /// faults (Redis restarts, paused holders, dropped connections), checked
    /// by fencing tokens; with --spawn-postgres or --postgres-url on the
    /// PostgreSQL provider (server restarts, paused holders,
    /// pg_terminate_backend). Exit status 1 on any mutual-exclusion
    /// violation.
    Torture(torture::TortureArgs),
    /// Internal: one torture worker (started by `torture`).
    #[command(hide = true)]
    TortureWorker(torture::TortureWorkerArgs),
    /// Internal: hold one lock as a process of its own (for fault
    /// injection tests).
    #[command(hide = true)]
    Hold(torture::hold::HoldArgs),
    /// Measure throughput, latency, fairness and cost against a real Redis
    /// (workloads w1, w2, w3, mem, waiters); prints JSON lines.
    Bench(bench::BenchArgs),
    /// Run a command while holding a lock: runs with the same KEY never
    /// overlap, on any machine (`flock(1)` across machines).
    ///
    /// The lock is taken within --wait, renewed every third of --ttl while
    /// the command runs, and released when it ends. The command gets
    /// LOCKSTEP_KEY and LOCKSTEP_FENCING_TOKEN (a number that grows with
    /// every acquisition: pass it with writes the lock guards, and have the
    /// store refuse lower ones). If the lease is lost (Redis found the lock
    /// gone, or did not answer until the lease ran out), the command gets
    /// SIGTERM, then SIGKILL after --grace. SIGINT and SIGTERM sent to
    /// `lockstep run` are passed on to the command, and the lock is held
    /// until it ends.
    ///
    /// Exit status: the command's (128 + N when signal N ended it); 75
    /// (--conflict-exit-code) when the lock stayed held by someone else for
    /// the whole wait; 76 when the lease was lost while the command ran,
    /// whatever its status; 126 when the command cannot be run, 127 when it
    /// is not found; 2 on bad usage or an unreachable backend.
    ///
    /// Example: lockstep run --redis-url redis://db:6379 --ttl 1m nightly --
    /// ./backup.sh
    Run(run::RunArgs),
    /// Who holds which lock: `locks list [--prefix P] [--owner O] [--json]`,
    /// `locks show KEY...`, and `locks force-release KEY... [--yes]`, which
    /// frees locks whoever holds them (the old holder's next renewal fails
    /// as a lost lease; the next holder's fencing token is higher).
    Locks(locks::LocksArgs),
    /// Connect to the backend (Redis: load the scripts), and time a lock
    /// round trip.
    Check {
        #[command(flatten)]
        redis: BackendArgs,
    },
    /// Release every lock of one owner, or of the whole namespace.
    ReleaseAll {
        #[command(flatten)]
        redis: BackendArgs,
        /// Only this owner's locks (without it: every lock of the namespace).
        #[arg(long)]
        owner: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::demo(args).await,
        Command::Worker(args) => demo::worker(args).await,
        Command::Report(args) => demo::report_run(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::Hold(args) => torture::hold::hold(args).await,
        Command::Torture(args) => torture::torture(args).await,
        Command::TortureWorker(args) => torture::torture_worker(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Locks(args) => locks::locks(args).await,
        Command::Check { redis } => check(&redis).await,
        Command::ReleaseAll { redis, owner } => release_all(&redis, owner).await,
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            eprintln!("lockstep: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

async fn check(args: &BackendArgs) -> CommandResult {
    let module = args.connect().await.map_err(Failure::usage)?.module;
    let key = format!("lockstep-check-{}", std::process::id());
    let started = std::time::Instant::now();
    let lease = module
        .acquire(
            key.as_str(),
            lockstep::AcquireOptions::new().expire(Duration::from_secs(5)),
        )
        .await?;
    let token = lease.fencing_token();
    lease.release().await?;
    let place = match &args.postgres_url {
        Some(_) => format!("schema {:?}", args.pg_schema),
        None => format!("namespace {:?}", args.namespace),
    };
    println!(
        "ok: acquire + release in {:?} (fencing token {token}), {place}",
        started.elapsed()
    );
    module.shutdown().await;
    Ok(EXIT_OK)
}

async fn release_all(args: &BackendArgs, owner: Option<String>) -> CommandResult {
    let module = args.connect().await.map_err(Failure::usage)?.module;
    let mut options = ReleaseOptions::new();
    if let Some(o) = &owner {
        options = options.owner_id(o);
    }
    let n = module.release_all(options).await?;
    println!("released {n} lock(s)");
    module.shutdown().await;
    Ok(EXIT_OK)
}
