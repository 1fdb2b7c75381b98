//! The Redis provider's waiting path: woken by releases and expiries, not by
//! timers; FIFO handoff; local coalescing; recovery from lost notifications.
//!
//! Providers here use a 60 s fallback period and waits of at most 10 s, so a
//! waiter that gets its lock was woken by the protocol (a release, a lease
//! expiry, a reconnect), never by the safety-net timer.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{AcquireOptions, LockingModule, RedisConfig, RedisProvider, ReleaseOptions};
use redis::AsyncCommands;
use support::{eventually, module_with, raw_connection, shared_url};
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(10);

fn config(namespace: &str) -> RedisConfig {
    RedisConfig::from_url(shared_url())
        .namespace(namespace)
        .wait_fallback(Duration::from_secs(60))
}

async fn provider(namespace: &str) -> RedisProvider {
    RedisProvider::connect(config(namespace)).await.unwrap()
}

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

fn waiting(o: &str) -> AcquireOptions {
    owner(o).timeout(WAIT)
}

/// A release wakes the waiter of another process: many rounds, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_wake_waiters_in_other_processes_without_loss() {
    let ns = support::unique_namespace();
    let (a, b) = (
        module_with(provider(&ns).await),
        module_with(provider(&ns).await),
    );
    for round in 0..50 {
        let held = a.acquire("k", owner("a")).await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire("k", waiting("b")).await });
        // Let the waiter queue up (or not: both orders must work).
        if round % 2 == 0 {
            tokio::task::yield_now().await;
        }
        assert!(held.release().await.unwrap());
        let lease = timeout(WAIT, waiter)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        assert!(lease.release().await.unwrap(), "round {round}");
    }
}

/// A lease that runs out wakes the waiter: no release is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_lease_wakes_the_waiter() {
    let ns = support::unique_namespace();
    let (a, b) = (
        module_with(provider(&ns).await),
        module_with(provider(&ns).await),
    );
    a.acquire("k", owner("a").expire(Duration::from_millis(300)))
        .await
        .unwrap();
    let started = Instant::now();
    let lease = b.acquire("k", waiting("b")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(lease.owner_id(), Some("b"));
}

/// Waiters of several processes are served in arrival order; a process with
/// several waiters serves them in order too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order_across_processes() {
    let ns = support::unique_namespace();
    let holder = module_with(provider(&ns).await);
    let p1 = module_with(provider(&ns).await);
    let p2 = module_with(provider(&ns).await);
    let held = holder.acquire("k", owner("h")).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let arrivals = [
        (&p1, "w1"),
        (&p2, "w2"),
        (&p1, "w3"),
        (&p2, "w4"),
        (&p1, "w5"),
    ];
    let mut c = raw_connection(&shared_url()).await;
    for (i, (m, name)) in arrivals.iter().enumerate() {
        let (m, name, order) = ((*m).clone(), name.to_string(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let lease = m.acquire("k", waiting(&name)).await.unwrap();
            order.lock().unwrap().push(name);
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(lease.release().await.unwrap());
        }));
        // Wait until this waiter is queued (in Redis or behind a local one)
        // before the next arrives.
        let queue_len = if i < 2 { i + 1 } else { 2 };
        let q = format!("{ns}{{k}}:q");
        eventually(Duration::from_secs(5), "the waiter queued", || {
            let (mut c, q) = (c.clone(), q.clone());
            async move { c.llen::<_, usize>(q).await.unwrap() >= queue_len }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queue: Vec<String> = c.lrange(format!("{ns}{{k}}:q"), 0, -1).await.unwrap();
    assert_eq!(
        queue.len(),
        2,
        "one entry per process, not per waiter: {queue:?}"
    );
    assert!(held.release().await.unwrap());
    for t in tasks {
        timeout(WAIT, t).await.expect("all served").unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["w1", "w2", "w3", "w4", "w5"]);
}

/// Many local waiters on one key are one entry in Redis, and are served in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_local_waiters_share_one_queue_entry_and_keep_their_order() {
    let ns = support::unique_namespace();
    let p = provider(&ns).await;
    let m = module_with(p.clone());
    let held = m.acquire("k", owner("h")).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    // A waiter arrives when its acquire is first polled: it joins the
    // local queue in that poll. (Spawn order is not arrival order on a busy
    // machine: a task may first run after the next one.)
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (m, order, arrivals) = (m.clone(), Arc::clone(&order), Arc::clone(&arrivals));
        tasks.push(tokio::spawn(async move {
            let owner = format!("w{i}");
            let mut acquire = std::pin::pin!(m.acquire("k", waiting(&owner)));
            let mut first = true;
            let lease = std::future::poll_fn(|cx| {
                if std::mem::take(&mut first) {
                    // Held through the poll: on two worker threads another
                    // task's first poll could otherwise join the local
                    // queue between this push and this join.
                    let mut arrivals = arrivals.lock().unwrap();
                    arrivals.push(i);
                    return acquire.as_mut().poll(cx);
                }
                acquire.as_mut().poll(cx)
            })
            .await
            .unwrap();
            order.lock().unwrap().push(i);
            lease.release().await.unwrap();
        }));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut c = raw_connection(&shared_url()).await;
    let queue: Vec<String> = c.lrange(format!("{ns}{{k}}:q"), 0, -1).await.unwrap();
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert!(held.release().await.unwrap());
    for t in tasks {
        timeout(WAIT, t).await.expect("all served").unwrap();
    }
    let order = order.lock().unwrap();
    assert_eq!(order.len(), 200);
    assert_eq!(*order, *arrivals.lock().unwrap(), "served in arrival order");
}

/// A lost notification (the subscription is cut while a release is
/// published) costs one retry after the reconnect, not a fallback period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_recovered_after_the_reconnect() {
    let server = support::RedisServer::start(&[]);
    let ns = support::unique_namespace();
    let cfg = |url: String| {
        RedisConfig::from_url(url)
            .namespace(&ns)
            .wait_fallback(Duration::from_secs(60))
    };
    let holder = module_with(RedisProvider::connect(cfg(server.url())).await.unwrap());
    let waiter_provider = RedisProvider::connect(cfg(server.url())).await.unwrap();
    let waiter_module = module_with(waiter_provider.clone());
    let held = holder.acquire("k", owner("h")).await.unwrap();
    let waiter = tokio::spawn(async move { waiter_module.acquire("k", waiting("w")).await });
    let mut admin = raw_connection(&server.url()).await;
    eventually(Duration::from_secs(5), "the waiter queued", || {
        let (mut c, q) = (admin.clone(), format!("{ns}{{k}}:q"));
        async move { c.llen::<_, usize>(q).await.unwrap() == 1 }
    })
    .await;
    // Cut every subscription, then release while the waiter cannot hear.
    let _: () = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(held.release().await.unwrap());
    let lease = timeout(WAIT, waiter)
        .await
        .expect("recovered well before the 60 s fallback")
        .unwrap()
        .unwrap();
    assert_eq!(lease.owner_id(), Some("w"));
    eventually(Duration::from_secs(5), "resubscribed", || async {
        waiter_provider.is_notified()
    })
    .await;
}

/// Waiters that give up leave nothing behind, and a lock reserved for a
/// process whose waiters all left is passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_give_up_leave_the_queue_and_pass_reservations_on() {
    let ns = support::unique_namespace();
    let (a, b, c2) = (
        module_with(provider(&ns).await),
        module_with(provider(&ns).await),
        module_with(provider(&ns).await),
    );
    let held = a.acquire("k", owner("a")).await.unwrap();
    let e = b
        .acquire("k", owner("b").timeout(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(e.is_contended());
    let mut c = raw_connection(&shared_url()).await;
    eventually(Duration::from_secs(5), "b withdrew its queue entry", || {
        let (mut c, q) = (c.clone(), format!("{ns}{{k}}:q"));
        async move { c.llen::<_, usize>(q).await.unwrap() == 0 }
    })
    .await;
    // Now a waiter in c: after a release it gets the lock, even though b
    // was queued before it once.
    let c3 = c2.clone();
    let waiter = tokio::spawn(async move { c3.acquire("k", waiting("c")).await });
    eventually(Duration::from_secs(5), "c queued", || {
        let (mut c, q) = (c.clone(), format!("{ns}{{k}}:q"));
        async move { c.llen::<_, usize>(q).await.unwrap() == 1 }
    })
    .await;
    assert!(held.release().await.unwrap());
    let lease = timeout(WAIT, waiter).await.unwrap().unwrap().unwrap();
    assert!(lease.release().await.unwrap());
    let leftovers: Vec<String> = c.keys(format!("{ns}*")).await.unwrap();
    assert!(leftovers.iter().all(|k| k.ends_with(":f")), "{leftovers:?}");
}

/// A waiter whose future is dropped leaves the queue; the next one is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_waiter_does_not_block_the_next() {
    let ns = support::unique_namespace();
    let (a, b) = (
        module_with(provider(&ns).await),
        module_with(provider(&ns).await),
    );
    let held = a.acquire("k", owner("a")).await.unwrap();
    let dropped = timeout(
        Duration::from_millis(200),
        b.acquire("k", waiting("dropped")),
    )
    .await;
    assert!(dropped.is_err());
    let b2 = b.clone();
    let next = tokio::spawn(async move { b2.acquire("k", waiting("next")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(held.release().await.unwrap());
    let lease = timeout(WAIT, next).await.unwrap().unwrap().unwrap();
    assert_eq!(lease.owner_id(), Some("next"));
    assert!(
        b.release("k", ReleaseOptions::new().owner_id("dropped"))
            .await
            .is_ok()
    );
}

/// Multi-key waiters are woken by the release of the key they wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_waiters_are_woken_by_releases() {
    let ns = support::unique_namespace();
    let (a, b) = (
        module_with(provider(&ns).await),
        module_with(provider(&ns).await),
    );
    let held = a.acquire("y", owner("a")).await.unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.acquire(["x", "y", "z"], waiting("b")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(held.release().await.unwrap());
    let lease = timeout(WAIT, waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(lease.keys(), ["x", "y", "z"]);
}

/// Barging mode: waiters are woken and race; everyone is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barging_mode_serves_everyone() {
    let ns = support::unique_namespace();
    let m = module_with(
        RedisProvider::connect(config(&ns).fair(false))
            .await
            .unwrap(),
    );
    let count = Arc::new(Mutex::new(0));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (m, count) = (m.clone(), Arc::clone(&count));
            tokio::spawn(async move {
                for _ in 0..5 {
                    let lease = m.acquire("k", waiting(&format!("w{i}"))).await.unwrap();
                    *count.lock().unwrap() += 1;
                    lease.release().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        timeout(WAIT * 3, t).await.unwrap().unwrap();
    }
    assert_eq!(*count.lock().unwrap(), 100);
}

/// Without notifications (a pool without a URL, or turned off), waiters
/// poll and still get their locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notifications_waiters_poll() {
    let ns = support::unique_namespace();
    let a = module_with(provider(&ns).await);
    let p = RedisProvider::connect(config(&ns).notifications(false))
        .await
        .unwrap();
    assert!(!p.is_notified());
    let b = module_with(p);
    let held = a.acquire("k", owner("a")).await.unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.acquire("k", waiting("b")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(held.release().await.unwrap());
    timeout(WAIT, waiter).await.unwrap().unwrap().unwrap();
    let _ = LockingModule::new();
}

/// Multi-key waiters under contention are never left waiting for a wake-up
/// that went to nobody: a release published before the waiter's own reply
/// arrives still wakes it. (With a 60 s fallback and 30 s leases, a lost
/// wake-up shows as a 3 s timeout; acquisitions here take milliseconds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_multi_key_waiters_never_miss_a_wake_up() {
    let ns = support::unique_namespace();
    let m = module_with(provider(&ns).await);
    let longest = Arc::new(Mutex::new(Duration::ZERO));
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let (m, longest) = (m.clone(), Arc::clone(&longest));
            tokio::spawn(async move {
                for i in 0..30 {
                    let keys = [
                        format!("k{}", (w + i) % 6),
                        format!("k{}", (w + i + 1) % 6),
                        format!("k{}", (w + i + 3) % 6),
                    ];
                    let started = Instant::now();
                    let lease = m
                        .acquire(
                            keys,
                            owner(&format!("w{w}"))
                                .expire(Duration::from_secs(30))
                                .timeout(WAIT),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("worker {w}, round {i}: {e}"));
                    let waited = started.elapsed();
                    {
                        let mut l = longest.lock().unwrap();
                        *l = (*l).max(waited);
                    }
                    assert!(lease.release().await.unwrap());
                }
            })
        })
        .collect();
    for t in tasks {
        timeout(WAIT * 2, t).await.expect("no stall").unwrap();
    }
    // Every wait here is a few holders long (milliseconds); a lost wake-up
    // would last until a later release of the same key rescued it.
    let longest = *longest.lock().unwrap();
    assert!(
        longest < Duration::from_secs(1),
        "a waiter waited {longest:?}"
    );
}

/// A multi-key waiter does not call Redis while another call of its
/// process holds one of its keys: woken by that release, it takes its keys
/// in one attempt (two round trips in all: the release and the attempt;
/// the wake-and-retry before took three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_key_waiter_sends_nothing_while_a_local_call_holds_a_key() {
    let ns = support::unique_namespace();
    let p = provider(&ns).await;
    let m = module_with(p.clone());
    let held = m.acquire("a", owner("holder")).await.unwrap();
    let before = p.round_trips();
    let m2 = m.clone();
    let waiter = tokio::spawn(async move { m2.acquire(["a", "b"], waiting("w")).await });
    let p2 = p.clone();
    eventually(WAIT, "the waiter registers", move || {
        let p = p2.clone();
        async move { p.waiting_locks() == 2 }
    })
    .await;
    // The provider's fallback is 60 s: only the gate keeps it from trying.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.round_trips(), before, "the waiter sent an attempt");
    assert!(held.release().await.unwrap());
    let lease = timeout(WAIT, waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(p.round_trips(), before + 2, "a release and one attempt");
    assert!(lease.release().await.unwrap());
    assert_eq!(p.waiting_locks(), 0);
}

/// The gate lets a named owner re-enter its own lock, lets an expired
/// lease through, and is advisory: a lock freed elsewhere (an operator's
/// force-release from another process) holds the waiter back for at most
/// its fallback period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_gate_lets_re_entry_expiry_and_outside_releases_through() {
    let ns = support::unique_namespace();
    let short = RedisConfig::from_url(shared_url())
        .namespace(&ns)
        .wait_fallback(Duration::from_millis(300));
    let p = RedisProvider::connect(short).await.unwrap();
    let m = module_with(p.clone());
    let operator = module_with(provider(&ns).await);

    let mine = m.acquire("a", owner("o")).await.unwrap();
    let both = m
        .acquire(["a", "b"], owner("o").timeout(Duration::from_millis(200)))
        .await
        .expect("the owner re-enters its own lock");
    assert!(both.was_reentered("a") && !both.was_reentered("b"));
    assert!(both.release().await.unwrap());
    drop(mine);

    let brief = m
        .acquire("c", owner("brief").expire(Duration::from_millis(100)))
        .await
        .unwrap();
    let next = m
        .acquire(["c", "d"], owner("next").timeout(Duration::from_secs(5)))
        .await
        .expect("an expired lease holds nobody back");
    assert!(next.fencing_token() > brief.fencing_token());
    assert!(next.release().await.unwrap());

    let stuck = m.acquire("e", owner("stuck")).await.unwrap();
    let m2 = m.clone();
    let waiter = tokio::spawn(async move { m2.acquire(["e", "f"], waiting("w")).await });
    eventually(WAIT, "the waiter registers", move || {
        let p = p.clone();
        async move { p.waiting_locks() == 2 }
    })
    .await;
    let freed = operator
        .force_release("e", Default::default())
        .await
        .unwrap();
    assert!(freed[0].is_some());
    let lease = timeout(WAIT, waiter).await.unwrap().unwrap().unwrap();
    assert!(lease.fencing_token() > stuck.fencing_token());
    assert!(!stuck.release().await.unwrap());
    assert!(lease.release().await.unwrap());
}
