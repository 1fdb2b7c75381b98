//! `waiters`: many waiters on one key in one process, served in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{AcquireOptions, LockError, LockingModule};
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::stats::round2;
use super::{BenchArgs, connect_with};
use crate::failure::Failure;

/// The resident set size of this process, in bytes (Linux).
pub(super) fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Many waiters on one key in this process, with a small pool. Runs on a
/// runtime of its own with one thread, where tasks first run in the order
/// they were spawned: arrival order is spawn order, so the order they are
/// served in can be checked exactly.
pub(super) async fn waiters(args: &BenchArgs, url: &str) -> Result<Value, Failure> {
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

pub(super) async fn waiters_in_order(
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
