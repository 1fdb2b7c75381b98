//! What the bench measures with: admin connections to the servers, their
//! command counts, the W2 holders counter, percentiles and medians.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::backend::BackendArgs;
use crate::failure::Failure;

/// An admin connection to each server that holds locks (by `host:port`).
pub(super) struct Nodes {
    pub(super) admins: Vec<(String, redis::aio::MultiplexedConnection)>,
    /// The first server's URL (credentials and database included).
    pub(super) first_url: String,
}

impl Nodes {
    pub(super) async fn connect(backend: &BackendArgs) -> Result<Nodes, Failure> {
        let mut admins = Vec::new();
        if backend.postgres_url.is_some() {
            // No Redis: no command counts, no server CPU from INFO.
            return Ok(Nodes {
                admins,
                first_url: String::new(),
            });
        }
        let nodes = backend.data_nodes().await.map_err(Failure::usage)?;
        for node in &nodes {
            // plain() sets no response timeout: flushing millions of keys
            // (the baseline leaves them) takes longer than redis-rs's
            // default half second.
            let conn = crate::backend::plain(&node.url).await.map_err(|e| {
                Failure::usage(format!("cannot reach Redis at {}: {e}", node.address))
            })?;
            admins.push((node.address.clone(), conn));
        }
        let first_url = nodes.first().map(|n| n.url.clone()).unwrap_or_default();
        Ok(Nodes { admins, first_url })
    }

    pub(super) async fn dbsize(&mut self) -> u64 {
        let mut size = 0;
        for (_, c) in &mut self.admins {
            size += redis::cmd("DBSIZE")
                .query_async::<u64>(c)
                .await
                .unwrap_or(0);
        }
        size
    }

    pub(super) async fn flush(&mut self) -> Result<(), Failure> {
        for (node, c) in &mut self.admins {
            redis::cmd("FLUSHDB")
                .exec_async(c)
                .await
                .map_err(|e| Failure::usage(format!("{node}: {e}")))?;
        }
        Ok(())
    }

    /// The servers' CPU time so far (user + system, all threads), in µs.
    pub(super) async fn cpu_us(&mut self) -> f64 {
        let mut total = 0.0;
        for (_, c) in &mut self.admins {
            let info: String = redis::cmd("INFO")
                .arg("cpu")
                .query_async(c)
                .await
                .unwrap_or_default();
            for field in ["used_cpu_sys:", "used_cpu_user:"] {
                total += info
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
        total * 1e6
    }

    /// Each server's command counts (INFO commandstats).
    pub(super) async fn commandstats(&mut self) -> Vec<HashMap<String, u64>> {
        let mut all = Vec::new();
        for (_, c) in &mut self.admins {
            all.push(commandstats(c).await);
        }
        all
    }
}

/// The W2 harness's holders counter: on the one server, the cluster, the
/// master the sentinels name, or the first Redlock master.
#[derive(Clone)]
pub(super) enum Counter {
    Plain(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
    /// In this process (PostgreSQL: no Redis; the workers are all here).
    Local(std::sync::Arc<std::sync::atomic::AtomicI64>),
}

impl Counter {
    pub(super) async fn connect(backend: &BackendArgs, nodes: &Nodes) -> Result<Counter, Failure> {
        let fail = |e: redis::RedisError| Failure::usage(e.to_string());
        if backend.postgres_url.is_some() {
            return Ok(Counter::Local(Default::default()));
        }
        if !backend.cluster.is_empty() {
            let client =
                redis::cluster::ClusterClient::new(backend.cluster.clone()).map_err(fail)?;
            let conn = client.get_async_connection().await.map_err(fail)?;
            return Ok(Counter::Cluster(conn));
        }
        let conn = crate::backend::plain(&nodes.first_url)
            .await
            .map_err(fail)?;
        Ok(Counter::Plain(conn))
    }

    /// Adds `by` to the counter; its new value (`i64::MIN` on an error).
    pub(super) async fn add(&mut self, by: i64) -> i64 {
        let result = match self {
            Counter::Plain(c) => c.incr("holders", by).await,
            Counter::Cluster(c) => c.incr("holders", by).await,
            Counter::Local(n) => {
                return n.fetch_add(by, std::sync::atomic::Ordering::SeqCst) + by;
            }
        };
        result.unwrap_or(i64::MIN)
    }
}

/// Sums of INFO commandstats calls by command.
pub(super) async fn commandstats(
    admin: &mut redis::aio::MultiplexedConnection,
) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// Commands the harness sends itself, left out of `redis_cmds_per_op`.
/// Not `incr`: the holders counter goes by `INCRBY` (redis-rs's `incr`),
/// and `INCR` is lockstep's fencing counter, which must be counted.
pub(super) const HARNESS: [&str; 6] = ["incrby", "decrby", "info", "flushdb", "dbsize", "ping"];

pub(super) fn commands_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .filter(|(name, _)| !HARNESS.contains(&name.as_str()))
        .map(|(name, calls)| calls.saturating_sub(*before.get(name).unwrap_or(&0)))
        .sum()
}

pub(super) fn percentiles(mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    let p = |q: f64| -> u64 {
        if v.is_empty() {
            return 0;
        }
        let rank = ((q / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    json!({"p50": p(50.0), "p99": p(99.0), "max": v.last().copied().unwrap_or(0)})
}

/// A small deterministic generator for key choices (no extra dependency).
pub(super) struct XorShift(pub(super) u64);

impl XorShift {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The medians of every numeric result across runs.
pub(super) fn medians(runs: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(Value::Object(first)) = runs[0].get("results") {
        for (k, v) in first {
            if v.is_number() {
                let mut xs: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r["results"][k].as_f64())
                    .collect();
                xs.sort_by(|a, b| a.total_cmp(b));
                out.insert(k.clone(), json!(xs[xs.len() / 2]));
            } else if let Value::Object(inner) = v {
                let mut m = serde_json::Map::new();
                for (ik, iv) in inner {
                    if iv.is_number() {
                        let mut xs: Vec<f64> = runs
                            .iter()
                            .filter_map(|r| r["results"][k][ik].as_f64())
                            .collect();
                        xs.sort_by(|a, b| a.total_cmp(b));
                        m.insert(ik.clone(), json!(xs[xs.len() / 2]));
                    }
                }
                out.insert(k.clone(), Value::Object(m));
            }
        }
    }
    json!({"workload": runs[0]["workload"], "params": runs[0]["params"], "median_of": runs.len(), "results": out})
}
