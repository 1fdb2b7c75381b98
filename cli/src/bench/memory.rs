//! `mem`: Redis memory per held lock.

use std::collections::HashMap;
use std::time::Duration;

use lockstep::{AcquireOptions, LockingModule};
use serde_json::{Value, json};

use super::stats::round2;
use super::{BenchArgs, connect};
use crate::failure::Failure;

/// Redis memory per held single-key lock, fencing state included.
pub(super) async fn memory(
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
