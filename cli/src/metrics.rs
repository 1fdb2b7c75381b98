//! `--metrics-addr`: the library's metrics (its `metrics` feature) kept by
//! a small recorder of this program's, and served in the Prometheus text
//! exposition format at `GET /metrics` while the command runs.
//!
//! Counters and gauges are kept as they are; a histogram as cumulative
//! buckets (`_bucket{le=..}`, fixed bounds in seconds), `_sum` and
//! `_count`. Only this process's series are served: with Redis, `demo`'s
//! workers and `torture`'s are other processes and are not included.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::failure::Failure;

/// Histogram bucket bounds, in seconds.
const BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Level(Mutex<f64>);

impl Level {
    fn get(&self) -> f64 {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn update(&self, f: impl FnOnce(&mut f64)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl GaugeFn for Level {
    fn increment(&self, value: f64) {
        self.update(|v| *v += value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| *v -= value);
    }
    fn set(&self, value: f64) {
        self.update(|v| *v = value);
    }
}

#[derive(Default, Clone)]
struct Buckets {
    /// Per bound (not cumulative); the rest only in `count`.
    counts: [u64; BOUNDS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Samples(Mutex<Buckets>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = BOUNDS.iter().position(|bound| value <= *bound) {
            b.counts[i] += 1;
        }
        b.sum += value;
        b.count += 1;
    }
}

enum Series {
    Counter(Arc<Count>),
    Gauge(Arc<Level>),
    Histogram(Arc<Samples>),
}

/// Series by name, then by rendered labels (`a="x",b="y"`, in the order
/// they were recorded).
#[derive(Default)]
struct Registry(Mutex<BTreeMap<String, BTreeMap<String, Series>>>);

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(key: &Key) -> String {
    key.labels()
        .map(|l| format!("{}=\"{}\"", l.key(), escape(l.value())))
        .collect::<Vec<_>>()
        .join(",")
}

impl Registry {
    fn entry(&self, key: &Key, make: impl FnOnce() -> Series) -> Series {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let series = all
            .entry(key.name().to_owned())
            .or_default()
            .entry(labels(key))
            .or_insert_with(make);
        match series {
            Series::Counter(c) => Series::Counter(Arc::clone(c)),
            Series::Gauge(g) => Series::Gauge(Arc::clone(g)),
            Series::Histogram(h) => Series::Histogram(Arc::clone(h)),
        }
    }

    /// Everything, in the Prometheus text format (version 0.0.4).
    fn render(&self) -> String {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, series) in all.iter() {
            let Some(first) = series.values().next() else {
                continue;
            };
            let kind = match first {
                Series::Counter(_) => "counter",
                Series::Gauge(_) => "gauge",
                Series::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, s) in series {
                let braced = |extra: &str| {
                    let inner = match (labels.is_empty(), extra.is_empty()) {
                        (true, _) => extra.to_owned(),
                        (false, true) => labels.clone(),
                        (false, false) => format!("{labels},{extra}"),
                    };
                    if inner.is_empty() {
                        String::new()
                    } else {
                        format!("{{{inner}}}")
                    }
                };
                match s {
                    Series::Counter(c) => {
                        let _ =
                            writeln!(out, "{name}{} {}", braced(""), c.0.load(Ordering::Relaxed));
                    }
                    Series::Gauge(g) => {
                        let _ = writeln!(out, "{name}{} {}", braced(""), g.get());
                    }
                    Series::Histogram(h) => {
                        let b = h.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let mut cumulative = 0;
                        for (bound, n) in BOUNDS.iter().zip(b.counts) {
                            cumulative += n;
                            let le = format!("le=\"{bound}\"");
                            let _ = writeln!(out, "{name}_bucket{} {cumulative}", braced(&le));
                        }
                        let _ = writeln!(out, "{name}_bucket{} {}", braced("le=\"+Inf\""), b.count);
                        let _ = writeln!(out, "{name}_sum{} {}", braced(""), b.sum);
                        let _ = writeln!(out, "{name}_count{} {}", braced(""), b.count);
                    }
                }
            }
        }
        out
    }
}

/// The recorder installed for the process.
struct Prometheus(Arc<Registry>);

impl Recorder for Prometheus {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.0.entry(key, || Series::Counter(Arc::default())) {
            Series::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.0.entry(key, || Series::Gauge(Arc::default())) {
            Series::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.0.entry(key, || Series::Histogram(Arc::default())) {
            Series::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

/// Installs the recorder and serves `GET /metrics` on `addr` in the
/// background, for as long as the process runs.
pub(crate) async fn serve(addr: SocketAddr) -> Result<(), Failure> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::usage(format!("--metrics-addr {addr}: {e}")))?;
    let registry = Arc::new(Registry::default());
    metrics::set_global_recorder(Prometheus(Arc::clone(&registry)))
        .map_err(|_| Failure::usage("a metrics recorder is already installed"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let _ = respond(stream, &registry).await;
            });
        }
    });
    Ok(())
}

/// Answers one request (HTTP/1.1, then closes).
async fn respond(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", registry.render()),
        ("GET", _) => ("404 Not Found", "not found: try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
