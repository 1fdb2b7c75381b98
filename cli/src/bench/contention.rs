//! W1, W2 and W3: workers acquiring and releasing, measured in a window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{AcquireOptions, Lease, LockingModule, PostgresProvider, RedisProvider};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::baseline::{BareError, BareLock};
use super::stats::{Counter, Nodes, XorShift, commands_between, percentiles, round2};
use super::{BenchArgs, tune};
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
    /// How long each successful release of an acquisition inside the window
    /// took, µs.
    released: Vec<u64>,
    timeouts: u64,
    violations: u64,
    errors: u64,
}

/// The lock a workload measures.
#[derive(Clone)]
pub(super) enum Subject {
    /// lockstep, through its module (the provider, for its round trips).
    Lockstep {
        module: LockingModule,
        provider: Option<RedisProvider>,
        postgres: Option<PostgresProvider>,
    },
    /// The bare lock of `--baseline`.
    Bare(BareLock),
}

/// What a worker holds between its acquire and its release.
enum Holding {
    Lease(Lease),
    Bare(Vec<String>, String),
}

/// How an acquisition ended.
enum Failed {
    TimedOut,
    Error,
}

impl Subject {
    async fn acquire(
        &self,
        keys: Vec<String>,
        options: &AcquireOptions,
        token: String,
    ) -> Result<Holding, Failed> {
        match self {
            Subject::Lockstep { module, .. } => match module.acquire(keys, options.clone()).await {
                Ok(lease) => Ok(Holding::Lease(lease)),
                Err(e) if e.is_contended() => Err(Failed::TimedOut),
                Err(_) => Err(Failed::Error),
            },
            Subject::Bare(bare) => match bare.acquire(&keys, &token).await {
                Ok(()) => Ok(Holding::Bare(keys, token)),
                Err(BareError::TimedOut) => Err(Failed::TimedOut),
                Err(BareError::Redis) => Err(Failed::Error),
            },
        }
    }

    async fn release(&self, holding: Holding) -> bool {
        match (self, holding) {
            (_, Holding::Lease(lease)) => lease.release().await.unwrap_or(false),
            (Subject::Bare(bare), Holding::Bare(keys, token)) => bare.release(&keys, &token).await,
            (Subject::Lockstep { .. }, Holding::Bare(..)) => false,
        }
    }

    fn round_trips(&self) -> Option<u64> {
        match self {
            Subject::Lockstep {
                provider, postgres, ..
            } => provider
                .as_ref()
                .map(RedisProvider::round_trips)
                .or_else(|| postgres.as_ref().map(PostgresProvider::statements)),
            Subject::Bare(_) => None,
        }
    }
}

/// Connects the subject of a run: lockstep as configured, or the bare lock
/// on one multiplexed connection to the same server.
pub(super) async fn subject(
    args: &BenchArgs,
    backend: &BackendArgs,
    nodes: &Nodes,
    bare: bool,
) -> Result<(Subject, &'static str), Failure> {
    if bare {
        let conn = crate::backend::plain(&nodes.first_url)
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
        let lock = BareLock::new(
            conn,
            args.ttl_ms,
            Duration::from_millis(args.wait_timeout_ms),
        );
        lock.warm_up()
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
        return Ok((Subject::Bare(lock), "bare"));
    }
    let connected = backend
        .connect_with(|c| tune(c, args, 8))
        .await
        .map_err(Failure::usage)?;
    // Warm-up: one operation (loads the scripts, opens the connections).
    let lease = connected
        .module
        .acquire(
            "warm-up",
            AcquireOptions::new().expire(Duration::from_secs(1)),
        )
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    lease
        .release()
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    let subject = Subject::Lockstep {
        module: connected.module,
        provider: connected.redis,
        postgres: connected.postgres,
    };
    Ok((subject, connected.kind))
}

/// W1, W2 and W3 on `subject`.
pub(super) async fn contention(
    args: &BenchArgs,
    backend: &BackendArgs,
    nodes: &mut Nodes,
    shape: Shape,
    subject: Subject,
    kind: &str,
) -> Result<Value, Failure> {
    let workers = args.concurrency.unwrap_or(match shape {
        Shape::OwnKey => 64,
        Shape::OneKey => 16,
        Shape::ThreeOf100 => 32,
    });
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
    let window = Duration::from_secs_f64(args.duration);
    let go = Arc::new(tokio::sync::Barrier::new(workers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Mutex::new(Instant::now()));
    let hold = Duration::from_micros(args.hold_us);
    let mut tasks = Vec::new();
    for i in 0..workers {
        let (subject, go, stop, start) = (
            subject.clone(),
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
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
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
                let holding = match subject.acquire(keys, &options, format!("w{i}-{n}")).await {
                    Ok(holding) => holding,
                    Err(Failed::TimedOut) => {
                        log.timeouts += 1;
                        continue;
                    }
                    Err(Failed::Error) => {
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
                let releasing = Instant::now();
                let released = subject.release(holding).await;
                if !released {
                    log.errors += 1;
                }
                let now = Instant::now();
                if now >= start && now <= start + window {
                    log.done.push((now, waited.as_micros() as u64));
                    if released {
                        log.released.push((now - releasing).as_micros() as u64);
                    }
                }
            }
            log
        }));
    }
    let stats_before = nodes.commandstats().await;
    let cpu_before = (nodes.cpu_us().await, client_cpu_us());
    let trips_before = subject.round_trips();
    *start.lock().unwrap() = Instant::now();
    go.wait().await;
    tokio::time::sleep(window).await;
    let trips_after = subject.round_trips();
    let cpu_after = (nodes.cpu_us().await, client_cpu_us());
    let stats_after = nodes.commandstats().await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.map_err(|e| Failure::usage(e.to_string()))?);
    }
    if let Subject::Lockstep { module, .. } = &subject {
        module.shutdown().await;
    }
    let measured = Measured {
        logs,
        window,
        per_node: stats_before
            .iter()
            .zip(&stats_after)
            .map(|(b, a)| commands_between(b, a))
            .collect(),
        round_trips: trips_before.zip(trips_after).map(|(b, a)| a - b),
        redis_cpu_us: cpu_after.0 - cpu_before.0,
        client_cpu_us: cpu_after.1.zip(cpu_before.1).map(|(a, b)| a - b),
    };
    let mut results = measured.results(shape, nodes);
    if shape == Shape::OneKey && backend.postgres_url.is_some() && args.hold_us > 0 {
        // The holders counter is in this process: the serial limit is the
        // hold alone, with a lock that cost nothing.
        let limit = 1e6 / args.hold_us as f64;
        results["serial_limit_per_s"] = json!(round2(limit));
        results["of_serial_limit"] = json!(round2(measured.per_s() / limit));
    } else if shape == Shape::OneKey && backend.is_single() && !nodes.admins.is_empty() {
        // The serial limit: one holder at a time, each paying the hold and
        // the two harness round trips (INCR, DECR) at PING speed, with a
        // lock that cost nothing.
        let ping = ping_us(&mut nodes.admins[0].1).await;
        let limit = 1e6 / (args.hold_us as f64 + 2.0 * ping);
        let per_s = measured.per_s();
        results["ping_us"] = json!(round2(ping));
        results["serial_limit_per_s"] = json!(round2(limit));
        results["of_serial_limit"] = json!(round2(per_s / limit));
    }
    let params = json!({
        "concurrency": workers, "duration_s": args.duration, "hold_us": args.hold_us,
        "ttl_ms": args.ttl_ms, "wait_timeout_ms": args.wait_timeout_ms,
        "fair": !args.barging, "notifications": !args.no_notifications, "functions": !args.no_functions, "owners": !args.anonymous,
    });
    Ok(json!({"workload": shape.name(), "backend": kind, "params": params, "results": results}))
}

impl Shape {
    pub(super) fn name(self) -> &'static str {
        match self {
            Shape::OwnKey => "w1",
            Shape::OneKey => "w2",
            Shape::ThreeOf100 => "w3",
        }
    }
}

/// What one window measured.
struct Measured {
    logs: Vec<WorkerLog>,
    window: Duration,
    /// Commands each server ran (the harness's own left out).
    per_node: Vec<u64>,
    /// Requests the provider sent (lockstep on one server only).
    round_trips: Option<u64>,
    redis_cpu_us: f64,
    client_cpu_us: Option<f64>,
}

impl Measured {
    fn ops(&self) -> u64 {
        self.logs.iter().map(|l| l.done.len() as u64).sum()
    }

    fn per_s(&self) -> f64 {
        self.ops() as f64 / self.window.as_secs_f64()
    }

    fn results(&self, shape: Shape, nodes: &Nodes) -> Value {
        let ops = self.ops();
        let per_op = |n: f64| {
            if ops == 0 {
                0.0
            } else {
                round2(n / ops as f64)
            }
        };
        let latencies: Vec<u64> = self
            .logs
            .iter()
            .flat_map(|l| l.done.iter().map(|d| d.1))
            .collect();
        let sum = |f: fn(&WorkerLog) -> u64| -> u64 { self.logs.iter().map(f).sum() };
        let mut results = match shape {
            Shape::OwnKey => json!({
                "pairs_per_s": round2(self.per_s()), "acquire_us": percentiles(latencies),
            }),
            _ => json!({
                "acq_per_s": round2(self.per_s()), "wait_us": percentiles(latencies),
                "timeouts": sum(|l| l.timeouts), "violations": sum(|l| l.violations),
            }),
        };
        results["errors"] = json!(sum(|l| l.errors));
        let released: Vec<u64> = self
            .logs
            .iter()
            .flat_map(|l| l.released.iter().copied())
            .collect();
        results["release_us"] = percentiles(released);
        if nodes.admins.is_empty() {
            // PostgreSQL: the provider's statements (one transaction each).
            if let Some(statements) = self.round_trips {
                results["statements_per_op"] = json!(per_op(statements as f64));
            }
        } else {
            if let Some(trips) = self.round_trips {
                results["client_cmds_per_op"] = json!(per_op(trips as f64));
            }
            results["redis_cmds_per_op"] = json!(per_op(self.per_node.iter().sum::<u64>() as f64));
            results["redis_cpu_us_per_op"] = json!(per_op(self.redis_cpu_us));
        }
        if let Some(client) = self.client_cpu_us {
            results["client_cpu_us_per_op"] = json!(per_op(client));
        }
        let spread: serde_json::Map<String, Value> = nodes
            .admins
            .iter()
            .zip(&self.per_node)
            .map(|((node, _), n)| (node.clone(), json!(n)))
            .collect();
        results["commands_per_node"] = Value::Object(spread);
        if shape == Shape::OneKey {
            let counts: Vec<u64> = self.logs.iter().map(|l| l.done.len() as u64).collect();
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
        }
        results
    }
}

/// This process's CPU time so far (user + system), in µs (Linux).
fn client_cpu_us() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the parenthesised command name: utime and stime are
    // the 12th and 13th, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10_000.0)
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
