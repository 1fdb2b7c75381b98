//! A randomized storm: tasks of two "processes" (two modules on the same
//! locks) doing random operations on a few keys, with random leases, waits
//! and outer timeouts, some aborted from outside. Checked throughout:
//! exclusion never breaks (a holder counter per key) and every call returns
//! within its deadline; at the end, after a final release, the provider
//! keeps nothing (no registry entry, no key but fencing counters).
//!
//! `LOCKSTEP_STORM_SECS` sets how long each provider's storm lasts
//! (default 3 s; CI runs 15 s on each of four providers).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, InMemoryProvider, LockingModule, RedisConfig,
    RedisProvider, ReleaseOptions,
};
use tokio::time::{Instant, sleep, timeout};

const KEYS: [&str; 3] = ["a", "b", "c"];
const TASKS: usize = 12;

/// How much later than its deadline a call may return (a round trip, an
/// undo queued behind it, a loaded machine).
const LATE: Duration = Duration::from_secs(2);

fn storm_duration() -> Duration {
    let secs = std::env::var("LOCKSTEP_STORM_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// A small deterministic generator (one per task).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

/// The counters every task checks against.
#[derive(Default)]
struct Shared {
    holders: [AtomicI64; 3],
    violations: AtomicU64,
    late: AtomicU64,
    operations: AtomicU64,
    acquired: AtomicU64,
}

impl Shared {
    /// Runs `hold` while counting the caller as the holder of `keys` (also
    /// when the task is aborted meanwhile).
    async fn holding(&self, keys: &[usize], hold: Duration) {
        struct Holding<'a>(&'a Shared, &'a [usize]);
        impl Drop for Holding<'_> {
            fn drop(&mut self) {
                for &k in self.1 {
                    self.0.holders[k].fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        for &k in keys {
            if self.holders[k].fetch_add(1, Ordering::SeqCst) != 0 {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        let _holding = Holding(self, keys);
        sleep(hold).await;
        self.acquired.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a call that took longer than `deadline` (plus [`LATE`]).
    fn on_time(&self, started: Instant, deadline: Duration, what: &str) {
        let took = started.elapsed();
        if took > deadline + LATE {
            eprintln!("{what} took {took:?}, deadline {deadline:?}");
            self.late.fetch_add(1, Ordering::SeqCst);
        }
        self.operations.fetch_add(1, Ordering::Relaxed);
    }
}

/// One task's loop until `end`.
async fn storm_task(m: LockingModule, shared: Arc<Shared>, seed: u64, end: Instant) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        let who = format!("t{seed}-{n}");
        let picked: Vec<usize> = match rng.below(3) {
            0 => vec![rng.below(3) as usize],
            _ => {
                let a = rng.below(3) as usize;
                let b = (a + 1 + rng.below(2) as usize) % 3;
                vec![a, b]
            }
        };
        let keys: Vec<&str> = picked.iter().map(|&k| KEYS[k]).collect();
        // Waits up to 300 ms; an outer timeout may cut the call shorter.
        let wait = rng.millis(300);
        let cut = rng.millis(400);
        let hold = rng.millis(5);
        let started = Instant::now();
        match rng.below(5) {
            // acquire, hold, release (by the lease, by a guard, or a release
            // dropped half-way and repeated)
            0..=2 => {
                // Leases far above the hold, so the counter stays honest:
                // an aborted holder's lock expires in a second. Locks
                // without expiry are guarded at once (no await in between),
                // so an aborted holder releases them in the background.
                let forever = rng.below(2) == 0;
                let mut options = AcquireOptions::new().owner_id(&who).timeout(wait);
                if !forever {
                    options = options.expire(Duration::from_secs(1));
                }
                let acquired = timeout(cut, m.acquire(keys.clone(), options)).await;
                shared.on_time(started, wait.min(cut), "acquire");
                let Ok(Ok(lease)) = acquired else { continue };
                let (guard, lease) = if forever {
                    (Some(lease.guard()), None)
                } else {
                    (None, Some(lease))
                };
                shared.holding(&picked, hold).await;
                match (guard, rng.below(3)) {
                    (Some(guard), 0) => {
                        guard.release().await.unwrap();
                    }
                    (Some(guard), _) => drop(guard),
                    (None, 0) => {
                        if let Some(lease) = lease {
                            lease.release().await.unwrap();
                        }
                    }
                    (None, _) => {
                        let release = m.release(keys.clone(), ReleaseOptions::new().owner_id(&who));
                        let _ = timeout(Duration::from_micros(rng.below(2000)), release).await;
                        m.release(keys.clone(), ReleaseOptions::new().owner_id(&who))
                            .await
                            .unwrap();
                    }
                }
            }
            // execute, cut short sometimes while its job runs
            3 => {
                let options = ExecuteOptions::new()
                    .expire(Duration::from_secs(5))
                    .timeout(wait);
                let shared2 = Arc::clone(&shared);
                let picked2 = picked.clone();
                let run = m.execute(keys.clone(), options, move |_held| async move {
                    shared2.holding(&picked2, hold).await;
                });
                let _ = timeout(cut, run).await;
                shared.on_time(started, wait.min(cut) + hold, "execute");
            }
            // extend someone else's lock (refused) or release_all of an owner
            // that holds nothing
            _ => {
                let extend = m.extend(
                    keys.clone(),
                    ExtendOptions::new(Duration::from_secs(1)).owner_id(&who),
                );
                assert!(extend.await.unwrap_err().is_lost());
                m.release_all(ReleaseOptions::new().owner_id(&who))
                    .await
                    .unwrap();
                shared.on_time(started, Duration::ZERO, "extend + release_all");
            }
        }
    }
}

/// Runs the storm on two modules of one provider (a second connection for
/// Redis, as another process), aborting a task now and then and starting
/// it again; then checks what is left.
async fn storm(
    module: LockingModule,
    peer: LockingModule,
    local: impl Fn() -> usize,
    stored: impl AsyncFn() -> Vec<String>,
) {
    let shared = Arc::new(Shared::default());
    let duration = storm_duration();
    let end = Instant::now() + duration;
    let spawn = |i: usize| {
        let m = if i.is_multiple_of(2) {
            module.clone()
        } else {
            peer.clone()
        };
        tokio::spawn(storm_task(m, Arc::clone(&shared), i as u64 + 1, end))
    };
    let mut tasks: Vec<_> = (0..TASKS).map(spawn).collect();
    let mut rng = Rng(0xA5A5);
    let mut aborted = 0;
    let mut next_seed = TASKS;
    while Instant::now() + Duration::from_millis(100) < end {
        sleep(rng.millis(200)).await;
        let i = rng.below(TASKS as u64) as usize;
        tasks[i].abort();
        aborted += 1;
        next_seed += 1;
        tasks[i] = spawn(next_seed);
    }
    for t in tasks {
        match timeout(Duration::from_secs(10), t).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("a storm task did not end within 10 s of the storm's end"),
        }
    }
    eprintln!(
        "storm: {} operations, {} acquisitions, {aborted} tasks aborted in {duration:?}",
        shared.operations.load(Ordering::Relaxed),
        shared.acquired.load(Ordering::Relaxed)
    );
    assert_eq!(
        shared.violations.load(Ordering::SeqCst),
        0,
        "two holders at once"
    );
    assert_eq!(
        shared.late.load(Ordering::SeqCst),
        0,
        "calls past their deadline"
    );
    assert!(shared.acquired.load(Ordering::Relaxed) > 0);
    // Every lock ends by itself: leases expire within 5 s (execute's, no
    // longer renewed), guards release in the background, undos and
    // withdraws finish. Nothing else may be left.
    let end = Instant::now() + Duration::from_secs(8);
    loop {
        let (l, s) = (local(), stored().await);
        if l == 0 && s.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "left behind: {l} registry entries, stored {s:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_in_memory() {
    let provider = InMemoryProvider::new();
    let module = LockingModule::builder()
        .in_memory(provider.clone())
        .build()
        .unwrap();
    let (p1, p2) = (provider.clone(), provider.clone());
    storm(
        module.clone(),
        module,
        move || p1.waiting_keys(),
        async move || {
            (p2.held() > 0)
                .then(|| format!("{} held", p2.held()))
                .into_iter()
                .collect()
        },
    )
    .await;
}

async fn redis_storm(configure: fn(RedisConfig) -> RedisConfig) {
    let ns = support::unique_namespace();
    let connect = || async {
        let config = configure(RedisConfig::from_url(support::shared_url()).namespace(&ns));
        RedisProvider::connect(config).await.unwrap()
    };
    let (a, b) = (connect().await, connect().await);
    let (pa, pb) = (a.clone(), b.clone());
    let url = support::shared_url();
    let ns2 = ns.clone();
    storm(
        support::module_with(a),
        support::module_with(b),
        move || pa.waiting_locks() + pb.waiting_locks(),
        async move || support::namespace_keys(std::slice::from_ref(&url), &ns2).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_redis_fair() {
    redis_storm(|c| c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_redis_barging() {
    redis_storm(|c| c.fair(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_redis_polling() {
    redis_storm(|c| c.notifications(false)).await;
}
