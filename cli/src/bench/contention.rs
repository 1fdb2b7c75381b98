//! W1, W2 and W3: workers acquiring and releasing, measured in a window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{AcquireOptions, RedisProvider};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::stats::{Counter, Nodes, XorShift, commands_between, percentiles, round2};
use super::{BenchArgs, baseline::baseline, tune};
use crate::backend::BackendArgs;
use crate::failure::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    OwnKey,
    OneKey,
    ThreeOf100,
}

/// What each worker recorded.
#[derive(Default)]
pub(super) struct WorkerLog {
    /// (completion time, latency in µs) of each acquisition inside the window.
    done: Vec<(Instant, u64)>,
    timeouts: u64,
    violations: u64,
    errors: u64,
}

/// W1, W2 and W3.
pub(super) async fn contention(
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
pub(super) async fn hold_for(d: Duration) {
    let until = Instant::now() + d;
    if d > Duration::from_millis(2) {
        tokio::time::sleep(d - Duration::from_millis(2)).await;
    }
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

/// The median PING round trip, in µs, over 200 pings.
pub(super) async fn ping_us(admin: &mut redis::aio::MultiplexedConnection) -> f64 {
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let _: Result<String, _> = redis::cmd("PING").query_async(admin).await;
        samples.push(t.elapsed().as_micros() as u64);
    }
    samples.sort_unstable();
    samples[samples.len() / 2] as f64
}
