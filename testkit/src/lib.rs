//! lockstep's test kit: real servers for tests and benchmarks, and the
//! tools to hurt them. Not published; the library's tests, the command
//! line's tests and `lockstep bench`/`torture` use it.
//!
//! # Layout
//!
//! - [`RedisServer`] (`server.rs`): THE redis-server launcher. A private
//!   server on a free loopback port (never `--port 0`, which turns TCP off),
//!   killed when dropped or when the process exits; and [`shared_url`], the
//!   Redis one test binary shares (`REDIS_URL`, else a spawned server, else
//!   Docker with the `testcontainers` feature).
//! - [`PostgresServer`] (`postgres.rs`): a private PostgreSQL (initdb into
//!   a fresh directory, `postgres` on a free loopback port, run as the
//!   `postgres` user when we are root), killed when dropped or when the
//!   process exits; and [`shared_postgres_url`], the PostgreSQL one test
//!   binary shares (`LOCKSTEP_POSTGRES_URL`, else a spawned server).
//! - [`cluster::Cluster`] (`cluster.rs`): a local Redis Cluster.
//! - [`sentinel::SentinelSet`] (`sentinel.rs`): a master, replicas and
//!   three sentinels.
//! - [`Proxy`] (`proxy.rs`): a TCP proxy that delays, partitions, drops
//!   replies and cuts connections.
//! - `docker.rs`: the testcontainers fallback (feature `testcontainers`).
//! - Waiting helpers: [`eventually`], [`wait_until_in_sync`],
//!   [`poll_then_drop`], [`every_poll`], [`every_moment`] and
//!   [`drop_everywhere`] (the cancel-safety harness), and
//!   [`raw_connection`] for looking at keys directly.
//!
//! Nothing here knows lockstep's types: it depends only on redis and tokio
//! (PostgreSQL is driven through its own binaries, std::process only),
//! so that the library's tests can use it without building lockstep twice.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod cluster;
#[cfg(feature = "testcontainers")]
mod docker;
mod postgres;
mod proxy;
pub mod sentinel;
mod server;

use std::time::Duration;

pub use postgres::{
    OwnSchema, PostgresServer, missing_postgres_help, pg_bin_dir, shared_postgres_url,
};
pub use proxy::Proxy;
pub use server::{
    RedisServer, free_port, missing_redis_help, server_bin, set_server_bin, shared_url,
};

/// A plain redis-rs connection to `url`, for looking at keys directly.
///
/// # Panics
///
/// When the URL is invalid or the server does not answer.
pub async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Waits until `check` is true, polling every few milliseconds.
///
/// # Panics
///
/// With `what` when `deadline` passes first.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `fut` at most `polls` times, letting the runtime run in between
/// (each poll when the future's own waker fires), then drops it: `Some` if
/// it completed first; `polls = 0` drops it unpolled. Bounded, so a future
/// that stops being woken fails the case instead of hanging it. Called with
/// k = 0, 1, 2, ... until the future completes, it drops the future at
/// every one of its await points: the cancel-safety tests' step.
///
/// # Panics
///
/// When the future is not woken for 20 s.
pub async fn poll_then_drop<F: std::future::Future>(fut: F, polls: usize) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut left = polls;
    let driven = std::future::poll_fn(move |cx| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        left -= 1;
        fut.as_mut().poll(cx).map(Some)
    });
    tokio::time::timeout(Duration::from_secs(20), driven)
        .await
        .expect("a future under test stopped making progress")
}

/// The most polls [`every_poll`] gives one future before it fails the case.
pub const MAX_POLLS: usize = 400;

/// Drives a cancel-safety case: `step(k)` runs the operation under test,
/// drops it after `k` polls ([`poll_then_drop`]), checks that it left
/// nothing behind, and says whether it completed; k = 0, 1, 2, ... until
/// one did. Returns that k (the points it was dropped at).
///
/// # Panics
///
/// When it has not completed within [`MAX_POLLS`] polls.
pub async fn every_poll<F, Fut>(name: &str, mut step: F) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for k in 0..MAX_POLLS {
        if step(k).await {
            eprintln!("{name}: dropped at {k} points, then completed");
            return k;
        }
    }
    panic!("{name}: still not done after {MAX_POLLS} polls");
}

/// The other half of a cancel-safety case, for an operation whose polls
/// vary in number from run to run (so that [`every_poll`] can step over an
/// await point): runs `make()` once undisturbed, then twenty times more,
/// each dropped at a moment spread over that first run's duration, which
/// lands in every phase lasting a twentieth of it. `done` takes each
/// output of a run that completed; after each run, `settled(when)` checks
/// that nothing was left behind.
pub async fn every_moment<T, M, MF, D, DF, S, SF>(mut make: M, mut done: D, mut settled: S)
where
    M: FnMut() -> MF,
    MF: std::future::Future<Output = T>,
    D: FnMut(T) -> DF,
    DF: std::future::Future<Output = ()>,
    S: FnMut(String) -> SF,
    SF: std::future::Future<Output = ()>,
{
    let started = tokio::time::Instant::now();
    done(make().await).await;
    let whole = started.elapsed();
    settled("after an undisturbed run".into()).await;
    for i in 1..=20 {
        let cut = whole * i / 20;
        if let Ok(output) = tokio::time::timeout(cut, make()).await {
            done(output).await;
        }
        settled(format!("after a run dropped at {cut:?}")).await;
    }
}

/// A whole cancel-safety case for an operation whose polls vary in number
/// from run to run: three [`every_poll`] sweeps (one can step over an await
/// point), then [`every_moment`]. Each run's output, if it completed, goes
/// to `done`; after each run `settled(when)` checks that it left nothing
/// behind.
pub async fn drop_everywhere<T, M, MF, D, DF, S, SF>(name: &str, mut make: M, done: D, settled: S)
where
    M: FnMut() -> MF,
    MF: std::future::Future<Output = T>,
    D: Fn(T) -> DF,
    DF: std::future::Future<Output = ()>,
    S: Fn(String) -> SF,
    SF: std::future::Future<Output = ()>,
{
    let (done, settled) = (&done, &settled);
    for _ in 0..3 {
        every_poll(name, |k| {
            let run = make();
            async move {
                let output = poll_then_drop(run, k).await;
                let completed = output.is_some();
                if let Some(output) = output {
                    done(output).await;
                }
                settled(format!("after a run dropped at poll {k}")).await;
                completed
            }
        })
        .await;
    }
    every_moment(make, done, settled).await;
}

/// Waits until the replica at `url` is in sync with its master.
///
/// # Panics
///
/// When it is not within 10 s.
pub async fn wait_until_in_sync(url: &str) {
    let c = raw_connection(url).await;
    eventually(Duration::from_secs(10), "the replica is in sync", || {
        let mut c = c.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap();
            info.contains("master_link_status:up")
        }
    })
    .await;
}
