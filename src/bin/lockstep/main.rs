//! The `lockstep` command line.
//!
//! Built only with the `cli` feature, so that programs using the library do
//! not compile argument parsing or JSON output.

mod backend;
mod bench;
mod checkout;
mod demo;
mod fenced;
mod hold;
mod torture;

use std::process::ExitCode;
use std::time::Duration;

use backend::BackendArgs;
use clap::{Parser, Subcommand};
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
    /// usage or an unreachable Redis.
    Demo(demo::DemoArgs),
    /// One demo instance as a process (started by `demo --redis-url`, or by
    /// docker compose with --start-now).
    #[command(hide = true)]
    Worker(demo::WorkerArgs),
    /// Report on a demo run made by standalone workers (docker compose).
    Report(demo::ReportArgs),
    /// A checkout-style workload from several processes under injected
    /// faults (Redis restarts, paused holders, dropped connections), checked
    /// by fencing tokens. Exit status 1 on any mutual-exclusion violation.
    Torture(torture::TortureArgs),
    /// One torture worker.
    #[command(hide = true)]
    TortureWorker(torture::TortureWorkerArgs),
    /// Hold one lock as a process of its own (for fault injection).
    #[command(hide = true)]
    Hold(hold::HoldArgs),
    /// Measure throughput, latency, fairness and cost against a real Redis
    /// (workloads w1, w2, w3, mem, waiters); prints JSON lines.
    Bench(bench::BenchArgs),
    /// Connect to Redis, load the scripts, and time a lock round trip.
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
        Command::Demo(args) => return finish(demo::demo(args).await),
        Command::Worker(args) => return finish(demo::worker(args).await),
        Command::Report(args) => return finish(demo::report_run(args).await),
        Command::Bench(args) => return finish(bench::bench(args).await),
        Command::Hold(args) => return finish(hold::hold(args).await),
        Command::Torture(args) => return finish(torture::torture(args).await),
        Command::TortureWorker(args) => return finish(torture::torture_worker(args).await),
        Command::Check { redis } => check(&redis).await,
        Command::ReleaseAll { redis, owner } => release_all(&redis, owner).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockstep: {e}");
            ExitCode::from(2)
        }
    }
}

fn finish(result: Result<u8, demo::Failure>) -> ExitCode {
    match result {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            eprintln!("lockstep: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn check(args: &BackendArgs) -> CliResult {
    let module = args.connect().await?.module;
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
    println!(
        "ok: acquire + release in {:?} (fencing token {token}), namespace {:?}",
        started.elapsed(),
        args.namespace
    );
    module.shutdown().await;
    Ok(())
}

async fn release_all(args: &BackendArgs, owner: Option<String>) -> CliResult {
    let module = args.connect().await?.module;
    let mut options = ReleaseOptions::new();
    if let Some(o) = &owner {
        options = options.owner_id(o);
    }
    let n = module.release_all(options).await?;
    println!("released {n} lock(s)");
    module.shutdown().await;
    Ok(())
}
