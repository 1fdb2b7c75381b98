//! The metrics (feature `metrics`): a scripted sequence on the in-memory
//! provider with every series checked, and on Redis the wake-ups by
//! notification, the waiting gauge after a dropped wait, and a script
//! reload after `SCRIPT FLUSH`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lockstep::{
    AcquireOptions, ExecuteOptions, LockError, LockingModule, RedisConfig, RedisProvider,
    ReleaseOptions,
};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use support::RedisServer;

/// A series: its name and its labels, sorted.
type Series = (String, BTreeMap<String, String>);

#[derive(Default)]
struct Store {
    counters: Mutex<HashMap<Series, Arc<Count>>>,
    gauges: Mutex<HashMap<Series, Arc<Level>>>,
    histograms: Mutex<HashMap<Series, Arc<Samples>>>,
}

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
impl GaugeFn for Level {
    fn increment(&self, value: f64) {
        *self.0.lock().unwrap() += value;
    }
    fn decrement(&self, value: f64) {
        *self.0.lock().unwrap() -= value;
    }
    fn set(&self, value: f64) {
        *self.0.lock().unwrap() = value;
    }
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);
impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn series(key: &Key) -> Series {
    let labels = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    (key.name().to_owned(), labels)
}

struct TestRecorder(Arc<Store>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = Arc::clone(
            self.0
                .counters
                .lock()
                .unwrap()
                .entry(series(key))
                .or_default(),
        );
        Counter::from_arc(c)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let g = Arc::clone(
            self.0
                .gauges
                .lock()
                .unwrap()
                .entry(series(key))
                .or_default(),
        );
        Gauge::from_arc(g)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let h = Arc::clone(
            self.0
                .histograms
                .lock()
                .unwrap()
                .entry(series(key))
                .or_default(),
        );
        Histogram::from_arc(h)
    }
}

/// The process's recorder (installed once; the tests keep to their own
/// provider labels).
fn store() -> &'static Arc<Store> {
    static STORE: OnceLock<Arc<Store>> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = Arc::new(Store::default());
        metrics::set_global_recorder(TestRecorder(Arc::clone(&store)))
            .expect("the only recorder of this test binary");
        store
    })
}

fn key(name: &str, labels: &[(&str, &str)]) -> Series {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    (name.to_owned(), labels)
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    store()
        .counters
        .lock()
        .unwrap()
        .get(&key(name, labels))
        .map_or(0, |c| c.0.load(Ordering::Relaxed))
}

fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    store()
        .gauges
        .lock()
        .unwrap()
        .get(&key(name, labels))
        .map(|g| *g.0.lock().unwrap())
}

fn samples(name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    store()
        .histograms
        .lock()
        .unwrap()
        .get(&key(name, labels))
        .map(|h| h.0.lock().unwrap().clone())
        .unwrap_or_default()
}

/// Every series with a label `provider=<provider>`, by name.
fn series_of(provider: &str) -> Vec<Series> {
    let s = store();
    let mut all: Vec<Series> = s
        .counters
        .lock()
        .unwrap()
        .keys()
        .chain(s.gauges.lock().unwrap().keys())
        .chain(s.histograms.lock().unwrap().keys())
        .filter(|(_, l)| l.get("provider").is_some_and(|p| p == provider))
        .cloned()
        .collect();
    all.sort();
    all
}

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

const MEM: &str = "in-memory";

#[tokio::test(start_paused = true)]
async fn in_memory_sequence_records_each_series() {
    store();
    let provider = lockstep::InMemoryProvider::new();
    let m = LockingModule::builder()
        .in_memory(provider.clone())
        .build()
        .unwrap();
    let peer = LockingModule::builder()
        .in_memory(provider.clone())
        .build()
        .unwrap();

    // Acquired, contended, timed out.
    let a = m.acquire("a", owner("o1")).await.unwrap();
    let e = m.acquire("a", owner("o2")).await.unwrap_err();
    assert!(matches!(e, LockError::Contended { .. }), "{e:?}");
    let e = m
        .acquire("a", owner("o2").timeout(Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::TimedOut { .. }), "{e:?}");
    assert_eq!(gauge("lockstep_waiting", &[("provider", MEM)]), Some(0.0));
    assert!(a.release().await.unwrap());

    // A waiter woken by a release (the gauge counts it meanwhile), and
    // one woken by the holder's lease running out.
    let n = m.acquire("n", owner("o1")).await.unwrap();
    let waiter = tokio::spawn({
        let m = m.clone();
        async move {
            m.acquire("n", owner("o2").timeout(Duration::from_secs(5)))
                .await
        }
    });
    // Paused time on one thread: the sleep ends only once every other task
    // is idle, so the waiter is asleep in its wait by then.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(gauge("lockstep_waiting", &[("provider", MEM)]), Some(1.0));
    assert!(n.release().await.unwrap());
    let n2 = waiter.await.unwrap().unwrap();
    assert!(n2.release().await.unwrap());
    let _w = m
        .acquire("w", owner("o1").expire(Duration::from_millis(100)))
        .await
        .unwrap();
    let w2 = m
        .acquire("w", owner("o2").timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(w2.release().await.unwrap());

    // An execute whose lease is lost: its one renewal fails.
    let e = m
        .execute(
            "lost",
            ExecuteOptions::new().expire(Duration::from_millis(300)),
            |held| async move {
                peer.release_all(ReleaseOptions::new()).await.unwrap();
                held.cancelled().await;
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::LeaseLost { .. }), "{e:?}");

    // An execute renewed every 100 ms while its job runs 450 ms.
    m.execute(
        "renewed",
        ExecuteOptions::new().expire(Duration::from_millis(300)),
        |_| tokio::time::sleep(Duration::from_millis(450)),
    )
    .await
    .unwrap();

    let acquire = |outcome| {
        samples(
            "lockstep_acquire_seconds",
            &[("provider", MEM), ("outcome", outcome)],
        )
    };
    // a, n, n2, w, w2, lost, renewed.
    assert_eq!(acquire("acquired").len(), 7);
    assert_eq!(acquire("contended").len(), 1);
    let timed_out = acquire("timed_out");
    assert_eq!(timed_out.len(), 1);
    assert!((0.049..1.0).contains(&timed_out[0]), "{timed_out:?}");
    assert!(acquire("error").is_empty());
    // a, n, n2, w2, lost, renewed (w expired, never released).
    assert_eq!(
        samples("lockstep_hold_seconds", &[("provider", MEM)]).len(),
        6
    );
    assert_eq!(
        counter("lockstep_leases_lost_total", &[("provider", MEM)]),
        1
    );
    let renewals = |outcome| {
        counter(
            "lockstep_renewals_total",
            &[("provider", MEM), ("outcome", outcome)],
        )
    };
    assert_eq!(renewals("failed"), 1);
    assert_eq!(renewals("ok"), 4);
    let wakeups = |cause| {
        counter(
            "lockstep_wakeups_total",
            &[("provider", MEM), ("cause", cause)],
        )
    };
    assert_eq!(wakeups("notification"), 1);
    assert_eq!(wakeups("expiry"), 1);
    assert_eq!(wakeups("fallback"), 0);
    assert_eq!(gauge("lockstep_waiting", &[("provider", MEM)]), Some(0.0));

    // Nothing else, and no key or owner in any label.
    let mut expected = vec![
        key(
            "lockstep_acquire_seconds",
            &[("provider", MEM), ("outcome", "acquired")],
        ),
        key(
            "lockstep_acquire_seconds",
            &[("provider", MEM), ("outcome", "contended")],
        ),
        key(
            "lockstep_acquire_seconds",
            &[("provider", MEM), ("outcome", "timed_out")],
        ),
        key("lockstep_hold_seconds", &[("provider", MEM)]),
        key("lockstep_leases_lost_total", &[("provider", MEM)]),
        key(
            "lockstep_renewals_total",
            &[("provider", MEM), ("outcome", "failed")],
        ),
        key(
            "lockstep_renewals_total",
            &[("provider", MEM), ("outcome", "ok")],
        ),
        key("lockstep_waiting", &[("provider", MEM)]),
        key(
            "lockstep_wakeups_total",
            &[("provider", MEM), ("cause", "expiry")],
        ),
        key(
            "lockstep_wakeups_total",
            &[("provider", MEM), ("cause", "notification")],
        ),
    ];
    expected.sort();
    assert_eq!(series_of(MEM), expected);
}

const REDIS: &str = "locking-redis";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wakeups_waiting_and_script_reloads() {
    store();
    // A private server: this test flushes its scripts.
    let server = RedisServer::start(&[]);
    let url = server.url();
    let provider = RedisProvider::connect(RedisConfig::from_url(url.clone()).namespace("m:"))
        .await
        .unwrap();
    let m = support::module_with(provider);
    let waiting = || gauge("lockstep_waiting", &[("provider", REDIS)]).unwrap_or(0.0);

    // Woken by a release.
    let held = m.acquire("k", owner("o1")).await.unwrap();
    let waiter = tokio::spawn({
        let m = m.clone();
        async move {
            m.acquire("k", owner("o2").timeout(Duration::from_secs(5)))
                .await
        }
    });
    support::eventually(Duration::from_secs(5), "the waiter waits", || async {
        waiting() == 1.0
    })
    .await;
    assert!(held.release().await.unwrap());
    waiter.await.unwrap().unwrap().release().await.unwrap();
    let wakeups = |cause| {
        counter(
            "lockstep_wakeups_total",
            &[("provider", REDIS), ("cause", cause)],
        )
    };
    assert_eq!(wakeups("notification"), 1);
    assert_eq!(waiting(), 0.0);

    // A waiting future dropped: the gauge goes back to 0.
    let held = m.acquire("d", owner("o1")).await.unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(200),
        m.acquire("d", owner("o2").timeout(Duration::from_secs(5))),
    )
    .await;
    assert!(dropped.is_err(), "still waiting when dropped");
    assert_eq!(waiting(), 0.0);
    assert!(held.release().await.unwrap());
    assert_eq!(
        samples(
            "lockstep_acquire_seconds",
            &[("provider", REDIS), ("outcome", "acquired")]
        )
        .len(),
        3
    );

    // A flushed script cache and function library: the next acquisition
    // loads what it runs again.
    let reloads = || counter("lockstep_script_reloads_total", &[("script", "acquire")]);
    let before = reloads();
    let mut raw = support::raw_connection(&url).await;
    for what in ["SCRIPT", "FUNCTION"] {
        let _: () = redis::cmd(what)
            .arg("FLUSH")
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    let s = m.acquire("s", owner("o1")).await.unwrap();
    assert_eq!(reloads(), before + 1);
    assert!(s.release().await.unwrap());
    m.shutdown().await;
}
