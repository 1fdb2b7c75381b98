//! Liveness and leak reproducers, one per finding of the cancel-safety
//! review (`review-findings.md`): each failed before its fix.

mod support;

use std::time::Duration;

use futures_util::FutureExt;
use lockstep::{AcquireOptions, ExecuteOptions, ExtendOptions, InMemoryProvider, LockingModule};
use tokio::time::{Instant, timeout};

/// Waits until the in-memory provider has waiters for `keys` keys.
async fn waiting_for(provider: &InMemoryProvider, keys: usize) {
    support::eventually(
        Duration::from_secs(2),
        "the waiter is registered",
        || async { provider.waiting_keys() == keys },
    )
    .await;
}

fn in_memory() -> (LockingModule, InMemoryProvider) {
    let provider = InMemoryProvider::new();
    let module = LockingModule::builder()
        .in_memory(provider.clone())
        .build()
        .unwrap();
    (module, provider)
}

/// In-memory, finding 3: a holder shortening its lease (`extend`) wakes a
/// waiter, which gets the lock once the new lease runs out instead of
/// sleeping forever (`wait_forever`) or until its own deadline.
#[tokio::test]
async fn in_memory_waiters_see_a_shortened_lease() {
    let (m, provider) = in_memory();
    m.acquire("k", AcquireOptions::new().owner_id("a"))
        .await
        .unwrap();
    for wait in [
        AcquireOptions::new().owner_id("w").wait_forever(),
        AcquireOptions::new()
            .owner_id("w")
            .timeout(Duration::from_secs(5)),
    ] {
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.acquire("k", wait).await }
        });
        waiting_for(&provider, 1).await;
        let extended = Instant::now();
        m.extend(
            "k",
            ExtendOptions::new(Duration::from_millis(100)).owner_id("a"),
        )
        .await
        .unwrap();
        let lease = timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter is woken when the shortened lease runs out")
            .unwrap()
            .unwrap();
        assert!(extended.elapsed() >= Duration::from_millis(100));
        // Give it back to "a" (no expiry) for the next round.
        assert!(lease.release().await.unwrap());
        m.acquire("k", AcquireOptions::new().owner_id("a"))
            .await
            .unwrap();
    }
}

/// In-memory, finding 3 (re-entry): re-acquiring with a shorter `expire`
/// wakes the waiters too.
#[tokio::test]
async fn in_memory_waiters_see_a_lease_shortened_by_reentry() {
    let (m, provider) = in_memory();
    m.acquire("k", AcquireOptions::new().owner_id("a"))
        .await
        .unwrap();
    let waiter = tokio::spawn({
        let m = m.clone();
        async move {
            m.acquire("k", AcquireOptions::new().owner_id("w").wait_forever())
                .await
        }
    });
    waiting_for(&provider, 1).await;
    m.acquire(
        "k",
        AcquireOptions::new()
            .owner_id("a")
            .expire(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    timeout(Duration::from_secs(1), waiter)
        .await
        .expect("woken when the re-entered lease runs out")
        .unwrap()
        .unwrap();
}

/// In-memory, finding 7: acquisitions dropped while waiting leave no entry
/// behind in the provider's waiter registry (10,000 distinct keys).
#[tokio::test]
async fn in_memory_dropped_waiters_leave_no_entries() {
    let (m, provider) = in_memory();
    let keys: Vec<String> = (0..10_000).map(|i| format!("order-{i}")).collect();
    for k in &keys {
        m.acquire(k.as_str(), AcquireOptions::new().owner_id("holder"))
            .await
            .unwrap();
    }
    for k in &keys {
        let waiting = m.acquire(
            k.as_str(),
            AcquireOptions::new()
                .owner_id("w")
                .timeout(Duration::from_secs(10)),
        );
        // Polled once (it registers and waits), then dropped.
        assert!(waiting.now_or_never().is_none());
    }
    assert_eq!(
        provider.waiting_keys(),
        0,
        "entries left by dropped waiters"
    );
}

/// Finding 9 (third of 11): `execute` on a provider whose default wait is
/// near `Duration::MAX` waits forever instead of panicking on the deadline.
#[tokio::test]
async fn execute_with_an_endless_default_wait_does_not_panic() {
    let m = LockingModule::builder()
        .in_memory(InMemoryProvider::with_wait_timeout(Duration::MAX))
        .build()
        .unwrap();
    let got = m
        .execute("k", ExecuteOptions::new(), |held| async move {
            held.fencing_token()
        })
        .await
        .unwrap();
    assert!(got > 0);
}

// ---------------------------------------------------------------------
// Redis.

use lockstep::{RedisConfig, RedisProvider, ReleaseOptions};
use redis::AsyncCommands;

async fn redis_with(ns: &str, configure: impl FnOnce(RedisConfig) -> RedisConfig) -> RedisProvider {
    let config = configure(RedisConfig::from_url(support::shared_url()).namespace(ns));
    RedisProvider::connect(config).await.unwrap()
}

/// Waits until `n` processes are queued for lock `key` in Redis.
async fn queued(p: &RedisProvider, key: &str, n: usize) {
    let mut c = support::raw_connection(&support::shared_url()).await;
    let queue = format!("{}:q", p.lock_key(key));
    support::eventually(Duration::from_secs(5), "a queued process", || {
        let (mut c, queue) = (c.clone(), queue.clone());
        async move { c.llen::<_, usize>(&queue).await.unwrap_or(0) >= n }
    })
    .await;
    let _: () = redis::cmd("PING").query_async(&mut c).await.unwrap();
}

/// Finding 1: a release dropped while it hands the lock to a local waiter
/// leaves no waiter stuck: the waiter (and the one behind it) still ends
/// within its deadline, and the lock is never left held under a waiter's
/// nonce that the waiter does not know about. The release is dropped after
/// each of its first polls: unsent, sent, answered.
#[tokio::test]
async fn a_dropped_release_does_not_strand_its_successor() {
    let ns = support::unique_namespace();
    let p = redis_with(&ns, |c| c).await;
    let m = support::module_with(p.clone());
    let mut conn = support::raw_connection(&support::shared_url()).await;
    for polls in 1..=4 {
        let key = format!("k{polls}");
        m.acquire(key.as_str(), AcquireOptions::new().owner_id("a"))
            .await
            .unwrap();
        let spawn_waiter = |owner: &'static str| {
            let (m, key) = (m.clone(), key.clone());
            tokio::spawn(async move {
                m.acquire(
                    key.as_str(),
                    AcquireOptions::new()
                        .owner_id(owner)
                        .timeout(Duration::from_secs(1)),
                )
                .await
            })
        };
        let b = spawn_waiter("b");
        queued(&p, &key, 1).await;
        let c = spawn_waiter("c");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let release = m.release(key.as_str(), ReleaseOptions::new().owner_id("a"));
        let released = support::poll_then_drop(release, polls).await;
        let mut holders = Vec::new();
        for (name, waiter) in [("b", b), ("c", c)] {
            match timeout(Duration::from_secs(3), waiter)
                .await
                .unwrap_or_else(|_| panic!("{name} ends within its deadline ({polls} polls)"))
                .unwrap()
            {
                Ok(lease) => {
                    holders.push(name);
                    assert!(lease.release().await.unwrap());
                }
                Err(e) => assert!(e.is_contended(), "{e}"),
            }
        }
        // Nobody holds the lock now, or "a" still does (its release never
        // went out): never a waiter that gave up.
        support::eventually(Duration::from_secs(2), "the key settles", || {
            let (mut conn, lock) = (conn.clone(), p.lock_key(&key));
            async move {
                // "a", a 12-byte nonce and the 16-byte tail (lua/prelude.lua).
                let v: Option<Vec<u8>> = conn.get(&lock).await.unwrap();
                v.is_none_or(|v| v.starts_with(b"a") && v.len() == 1 + 12 + 16)
            }
        })
        .await;
        eprintln!("{polls} polls: release {released:?}, acquired by {holders:?}");
        let _ = m
            .release(key.as_str(), ReleaseOptions::new().owner_id("a"))
            .await;
    }
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

/// Finding 4: a waiter that gives up withdraws its process's queue entry
/// in the background; a new waiter of the same process that starts at once
/// must not lose its place to that withdraw (it would sleep unqueued and
/// hear nothing until its fallback).
#[tokio::test]
async fn a_waiter_giving_up_does_not_unqueue_the_next_one() {
    let ns = support::unique_namespace();
    let slow_fallback = |c: RedisConfig| c.wait_fallback(Duration::from_secs(10));
    let p1 = support::module_with(redis_with(&ns, slow_fallback).await);
    let p2 = support::module_with(redis_with(&ns, slow_fallback).await);
    let held = p2
        .acquire(
            "k",
            AcquireOptions::new()
                .owner_id("holder")
                .expire(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let gave_up = p1
        .acquire(
            "k",
            AcquireOptions::new()
                .owner_id("b")
                .timeout(Duration::from_millis(200)),
        )
        .await;
    assert!(gave_up.unwrap_err().is_contended());
    // At once, in the same task (polled first by `join!`): its first
    // attempt goes out before the background withdraw of b's entry.
    let c = async {
        let lease = p1
            .acquire(
                "k",
                AcquireOptions::new()
                    .owner_id("c")
                    .timeout(Duration::from_secs(5)),
            )
            .await;
        (lease, Instant::now())
    };
    let release = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = Instant::now();
        assert!(held.release().await.unwrap());
        at
    };
    let ((lease, got), released) = tokio::join!(c, release);
    assert!(lease.is_ok(), "{lease:?}");
    assert!(
        got - released < Duration::from_millis(300),
        "c got the lock {:?} after the release: it was not queued",
        got - released
    );
}

/// Finding 5: a multi-key waiter that gives up must not pass on a
/// reservation made for a single-key waiter of its process. Here the
/// process hears of the reservation late (its subscription goes through a
/// slow proxy), the multi-key waiter times out meanwhile, and the
/// single-key waiter must still be served before another process's waiter
/// queued after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_key_waiter_giving_up_keeps_the_single_key_waiters_turn() {
    let server = support::RedisServer::start(&[]);
    let proxy = support::Proxy::start(server.port);
    let ns = support::unique_namespace();
    let config = || {
        RedisConfig::from_url(server.url())
            .namespace(&ns)
            .wait_fallback(Duration::from_secs(10))
    };
    // P: commands straight to Redis, notifications through the proxy.
    let direct = RedisProvider::connect(config()).await.unwrap();
    let pool = direct.pool().unwrap();
    let mut through_proxy = config();
    through_proxy.url = Some(proxy.url());
    let p = support::module_with(
        RedisProvider::from_pool(pool, &through_proxy)
            .await
            .unwrap(),
    );
    let q = support::module_with(RedisProvider::connect(config()).await.unwrap());
    let h = support::module_with(RedisProvider::connect(config()).await.unwrap());
    let holder = |o: &str| AcquireOptions::new().owner_id(o);
    h.acquire("k", holder("h")).await.unwrap();
    h.acquire("j", holder("h")).await.unwrap();
    let wait = |o: &str, secs| {
        AcquireOptions::new()
            .owner_id(o)
            .timeout(Duration::from_secs(secs))
    };
    let b = tokio::spawn({
        let p = p.clone();
        async move {
            let lease = p.acquire("k", wait("b", 10)).await?;
            let at = Instant::now();
            lease.release().await.map(|_| at)
        }
    });
    support::eventually(Duration::from_secs(2), "b queued", || async {
        let mut c = support::raw_connection(&server.url()).await;
        c.llen::<_, usize>(format!("{ns}{{k}}:q")).await.unwrap() == 1
    })
    .await;
    let m = tokio::spawn({
        let p = p.clone();
        async move {
            p.acquire(
                ["k", "j"],
                AcquireOptions::new()
                    .owner_id("m")
                    .timeout(Duration::from_millis(700)),
            )
            .await
        }
    });
    let d = tokio::spawn({
        let q = q.clone();
        async move {
            let lease = q.acquire("k", wait("d", 10)).await?;
            let at = Instant::now();
            lease.release().await.map(|_| at)
        }
    });
    support::eventually(Duration::from_secs(2), "m and d queued", || async {
        let mut c = support::raw_connection(&server.url()).await;
        c.llen::<_, usize>(format!("{ns}{{k}}:q")).await.unwrap() == 3
    })
    .await;
    // P hears of the reservation only after m has given up.
    proxy.set_latency(Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.release("k", ReleaseOptions::new().owner_id("h"))
            .await
            .unwrap()
    );
    assert!(m.await.unwrap().unwrap_err().is_contended());
    let (b, d) = (b.await.unwrap(), d.await.unwrap());
    let (b, d) = (b.expect("b gets k"), d.expect("d gets k"));
    assert!(b < d, "b (queued first) was served after d");
}

/// Finding 6: an owner's index that once recorded a lock without expiry
/// does not stay for good: once that lock is released, nothing of the
/// index outlives the owner's other leases.
#[tokio::test]
async fn an_owner_index_expires_once_its_permanent_lock_is_released() {
    let ns = support::unique_namespace();
    let p = redis_with(&ns, |c| c).await;
    let m = support::module_with(p.clone());
    let run = AcquireOptions::new().owner_id("run-1");
    m.acquire("k1", run.clone()).await.unwrap();
    m.acquire("k2", run.expire(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(
        m.release("k1", ReleaseOptions::new().owner_id("run-1"))
            .await
            .unwrap()
    );
    // Nothing of the index outlives k2's lease by much: the permanent part
    // went with k1, and the expiring part ends within a step (a second
    // here; see index_score in lua/prelude.lua) of k2's lease.
    let mut c = support::raw_connection(&support::shared_url()).await;
    let permanent = format!("{ns}{{run-1}}:p");
    assert!(
        !c.exists::<_, bool>(&permanent).await.unwrap(),
        "{permanent} is kept for good, with nothing live in it"
    );
    let index = format!("{ns}{{run-1}}:o");
    let pttl: i64 = c.pttl(&index).await.unwrap();
    assert!(
        (0..=1_300).contains(&pttl),
        "{index} is kept for good, with nothing live in it: {pttl}"
    );
}

/// Finding 9 (second of 11): renewing `execute`'s lease does not create an
/// owner index for its owner (execute's owners are never indexed).
#[tokio::test]
async fn execute_renewals_do_not_index_their_owner() {
    let ns = support::unique_namespace();
    let m = support::module_with(redis_with(&ns, |c| c).await);
    let url = support::shared_url();
    let indexes = m
        .execute(
            "k",
            ExecuteOptions::new().expire(Duration::from_millis(300)),
            |_held| async move {
                // Past the first renewal (every 100 ms), before the release.
                tokio::time::sleep(Duration::from_millis(250)).await;
                let mut c = support::raw_connection(&url).await;
                c.keys::<_, Vec<String>>(format!("{ns}*:o")).await.unwrap()
            },
        )
        .await
        .unwrap();
    assert!(indexes.is_empty(), "{indexes:?}");
}

/// Finding 10: an idle provider keeps its notification subscription: the
/// keep-alive PING on the subscribed connection is answered as a
/// subscribed connection answers (an array), which used to count as a
/// failure and reconnect every 2 s. A waiter with a long fallback is then
/// woken by the release, not by reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_stays_connected() {
    let server = support::RedisServer::start(&[]);
    let ns = support::unique_namespace();
    let config = || {
        RedisConfig::from_url(server.url())
            .namespace(&ns)
            .wait_fallback(Duration::from_secs(60))
    };
    let waiter_provider = RedisProvider::connect(config()).await.unwrap();
    let waiters = support::module_with(waiter_provider.clone());
    let holder = support::module_with(RedisProvider::connect(config()).await.unwrap());
    let held = holder
        .acquire("k", AcquireOptions::new().owner_id("h"))
        .await
        .unwrap();
    let mut admin = support::raw_connection(&server.url()).await;
    let connections = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let before = connections(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut admin)
            .await
            .unwrap(),
    );
    let trips_before = waiter_provider.round_trips();
    let waiter = tokio::spawn(async move {
        waiters
            .acquire(
                "k",
                AcquireOptions::new()
                    .owner_id("w")
                    .timeout(Duration::from_secs(30)),
            )
            .await
    });
    // Three keep-alive periods and more.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = connections(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut admin)
            .await
            .unwrap(),
    );
    assert_eq!(after, before, "connections were made while idle");
    assert_eq!(
        waiter_provider.round_trips() - trips_before,
        1,
        "the waiter was woken without news"
    );
    let released = Instant::now();
    assert!(held.release().await.unwrap());
    timeout(Duration::from_secs(2), waiter)
        .await
        .expect("woken by the release")
        .unwrap()
        .unwrap();
    assert!(released.elapsed() < Duration::from_secs(1));
}

/// Finding 8: the undo of an unanswered acquisition goes out on a new
/// connection and could reach Redis before the acquisition itself, still on
/// its way on the old one (delayed packets), which then took the lock for
/// good. The undo first closes the old connection on the server (CLIENT
/// KILL), so what it still carries never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_is_not_overtaken_by_its_delayed_acquisition() {
    let server = support::RedisServer::start(&[]);
    let proxy = support::Proxy::start(server.port);
    let ns = support::unique_namespace();
    let config = RedisConfig::from_url(proxy.url())
        .namespace(&ns)
        .notifications(false)
        .response_timeout(Duration::from_millis(300));
    let p = RedisProvider::connect(config).await.unwrap();
    let m = support::module_with(p.clone());
    m.acquire("warm", AcquireOptions::new()).await.unwrap();
    m.release("warm", ReleaseOptions::new()).await.unwrap();
    let mut admin = support::raw_connection(&server.url()).await;
    // Scripts run by EVALSHA or as functions (FCALL).
    let scripts_run = |info: String| -> u64 {
        info.lines()
            .filter_map(|l| {
                l.strip_prefix("cmdstat_evalsha:calls=")
                    .or_else(|| l.strip_prefix("cmdstat_fcall:calls="))
            })
            .filter_map(|v| v.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    let info = |mut c: redis::aio::MultiplexedConnection| async move {
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async::<String>(&mut c)
            .await
            .unwrap()
    };
    let before = scripts_run(info(admin.clone()).await);
    proxy.stall_open_connections();
    let e = m
        .acquire("k", AcquireOptions::new().owner_id("a"))
        .await
        .unwrap_err();
    assert!(e.is_outcome_unknown(), "{e}");
    // The undo runs in the background, on a new connection: its release
    // script has run once the server counts one more script call.
    support::eventually(Duration::from_secs(3), "the undo ran", || {
        let admin = admin.clone();
        async move { scripts_run(info(admin).await) > before }
    })
    .await;
    proxy.unstall();
    support::eventually(
        Duration::from_secs(3),
        "the delayed bytes are gone",
        || async { proxy.stalled_bytes() == 0 },
    )
    .await;
    // Whatever reached the server has run by the time this answers.
    let held: Option<Vec<u8>> = admin.get(format!("{ns}{{k}}")).await.unwrap();
    assert_eq!(
        held, None,
        "the delayed acquisition took the lock after its undo"
    );
}
