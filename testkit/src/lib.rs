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
//!   [`poll_then_drop`] (the cancel-safety harness's step), and
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
