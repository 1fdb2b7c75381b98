//! The provider contract: one suite, run against every provider.
//!
//! Each case is an `async fn(&Fixture)`. `contract_suite!(make_fixture)`
//! turns every case into a `#[tokio::test]` of the including test binary, so
//! `tests/memory_contract.rs`, `tests/redis_contract.rs` (three waiting
//! modes), `tests/cluster.rs` and `tests/redlock.rs` run the very same
//! cases, including the drop-at-every-poll cases of `drops.rs`.
//!
//! Names start with Medusa's conformance ids (S1-S6: the scenarios of
//! Medusa's docs; C1-C12: Medusa's own test cases of its locking module),
//! `d_` for a documented difference from Medusa (the README's "Where
//! lockstep differs" table), which every provider must show the same way,
//! `drop_` for a future dropped at every one of its polls, or `i_` for
//! inspection and force-release (`inspect.rs`).
#![allow(dead_code)]

pub mod drops;
pub mod inspect;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use lockstep::provider::LockingProvider;
use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, InvalidInput, LockError, LockingModule,
    ReleaseOptions,
};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, timeout};

/// What a case runs against.
pub struct Fixture {
    /// A module whose default provider is the provider under test.
    pub module: LockingModule,
    /// Another module on the same locks: for Redis a second connection (as
    /// another process would have), for in-memory the same provider.
    pub peer: LockingModule,
    /// The provider under test, to register it in modules of a case's own.
    pub provider: Arc<dyn LockingProvider>,
    /// What the provider keeps, for the drop cases' leak checks.
    pub residue: Residue,
    /// Whether waiters are served in arrival order (fair Redis, not
    /// barging, polling, in-memory or Redlock).
    pub fifo: bool,
}

pub use crate::support::Residue;

/// Generates one `#[tokio::test]` per contract case.
macro_rules! contract_suite {
    ($make:path) => {
        contract_suite!(@cases $make;
            s1_execute_serializes_concurrent_buyers,
            s2_owner_checked_acquire_and_release,
            s3_same_owner_reenters_others_fail,
            s4_anonymous_locks,
            s5_execute_releases_after_job_error,
            s6_execute_waits_then_times_out,
            c1_keys_as_one_string_or_a_list,
            c2_default_provider_rules,
            c3_unknown_provider_is_a_typed_error,
            c4_execute_runs_after_all_keys_held_and_returns_the_result,
            c5_execute_timeout_fails_without_running_the_job,
            c6_execute_owner_is_fresh_per_call_and_lease_is_not_the_timeout,
            c7_execute_renews_its_lease_while_the_job_runs,
            c7_execute_signals_and_reports_a_lost_lease,
            c8_timed_out_execute_leaves_nothing_held,
            c9_failure_names_the_held_key,
            c10_expire_resets_on_reentry_and_no_expire_means_forever,
            c11_multi_key_release_reports_and_frees_what_it_can,
            c12_release_all_with_owner_frees_exactly_its_locks,
            d_multi_key_acquire_is_all_or_nothing,
            d_opposite_orders_never_deadlock,
            d_duplicate_keys_are_taken_once,
            d_zero_timeout_is_one_attempt_and_waits_are_bounded,
            d_millisecond_leases,
            d_expired_lock_is_free_for_anyone,
            d_release_without_owner_frees_only_anonymous_locks,
            d_release_all_without_owner_frees_everything,
            d_reentry_without_expire_keeps_the_lease,
            d_same_owner_never_waits_for_itself,
            d_no_owner_id_collides_with_the_anonymous_marker,
            d_fencing_tokens_grow_across_release_expiry_and_reentry,
            d_waiter_wakes_on_release,
            d_waiter_wakes_on_expiry,
            d_extend_is_owner_checked,
            d_execute_releases_when_the_job_panics,
            d_bad_input_is_a_typed_error_and_holds_nothing,
            d_lease_release_and_newly_acquired_keys,
            i_inspect_reports_holder_token_lease_time_and_waiters,
            i_reentry_shows_the_newest_token,
            i_locks_lists_held_locks_oldest_first,
            i_force_release_frees_fences_and_tells_the_old_holder,
            i_metadata_is_checked_and_recorded,
            drop_acquire_of_a_free_key,
            drop_acquire_while_waiting,
            drop_release_with_waiters,
            drop_extend,
            drop_force_release_with_waiters,
            drop_inspect_and_locks,
            drop_release_all,
            drop_execute,
            drop_lease_release_and_extend,
            drop_guard_release,
            drop_workflow_run,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $make().await;
                crate::contract::$case(&fixture).await;
                fixture.module.shutdown().await;
            }
        )*
    };
}
pub(crate) use contract_suite;

pub use drops::{
    drop_acquire_of_a_free_key, drop_acquire_while_waiting, drop_execute, drop_extend,
    drop_force_release_with_waiters, drop_guard_release, drop_inspect_and_locks,
    drop_lease_release_and_extend, drop_release_all, drop_release_with_waiters, drop_workflow_run,
};
pub use inspect::{
    i_force_release_frees_fences_and_tells_the_old_holder,
    i_inspect_reports_holder_token_lease_time_and_waiters, i_locks_lists_held_locks_oldest_first,
    i_metadata_is_checked_and_recorded, i_reentry_shows_the_newest_token,
};

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

fn by(o: &str) -> ReleaseOptions {
    ReleaseOptions::new().owner_id(o)
}

/// Whether `key` can be taken right now by a fresh owner (taken back at once).
pub async fn is_free(m: &LockingModule, key: &str) -> bool {
    let probe = format!("probe-{}", uuid_v4ish());
    match m.acquire(key, owner(&probe)).await {
        Ok(lease) => {
            assert!(lease.release().await.expect("release the probe"));
            true
        }
        Err(e) if e.is_contended() => false,
        Err(e) => panic!("probe of {key} failed: {e}"),
    }
}

fn uuid_v4ish() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    format!("{:x}", h.finish())
}

fn assert_contended(r: Result<lockstep::Lease, LockError>, key: &str) {
    match r {
        Err(LockError::Contended { key: k }) => assert_eq!(k, key),
        other => panic!("expected Failed to acquire lock for key {key:?}, got {other:?}"),
    }
}

/// S1: ten concurrent unlocked buyers oversell a stock of five; under
/// `execute` the stock ends at exactly zero.
pub async fn s1_execute_serializes_concurrent_buyers(f: &Fixture) {
    // Medusa's buy(): check the stock, do some async work, take one.
    async fn buy(stock: &AtomicI64) {
        if stock.load(Ordering::SeqCst) > 0 {
            sleep(Duration::from_millis(5)).await;
            stock.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let unlocked = Arc::new(AtomicI64::new(5));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = Arc::clone(&unlocked);
            tokio::spawn(async move { buy(&s).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        unlocked.load(Ordering::SeqCst) < 0,
        "without a lock the race oversells"
    );

    let stock = Arc::new(AtomicI64::new(5));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (m, stock) = (f.module.clone(), Arc::clone(&stock));
            tokio::spawn(async move {
                m.execute(
                    "item_1",
                    ExecuteOptions::new().timeout(Duration::from_secs(20)),
                    |_| async { buy(&stock).await },
                )
                .await
                .expect("execute")
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(stock.load(Ordering::SeqCst), 0);
}

/// S2: another owner can neither release nor take the lock; the owner can.
pub async fn s2_owner_checked_acquire_and_release(f: &Fixture) {
    let m = &f.module;
    let _l = m.acquire("key_name", owner("user_id_123")).await.unwrap();
    assert!(!m.release("key_name", by("user_id_456")).await.unwrap());
    assert_contended(
        m.acquire("key_name", owner("user_id_456")).await,
        "key_name",
    );
    assert!(m.release("key_name", by("user_id_123")).await.unwrap());
    assert!(is_free(m, "key_name").await);
}

/// S3: the same owner re-acquires (twice), another owner fails (twice);
/// one release by the owner frees it (re-entry is not counted).
pub async fn s3_same_owner_reenters_others_fail(f: &Fixture) {
    let m = &f.module;
    m.acquire("k", owner("u1")).await.unwrap();
    m.acquire("k", owner("u1")).await.unwrap();
    assert_contended(m.acquire("k", owner("u2")).await, "k");
    assert_contended(m.acquire("k", owner("u2")).await, "k");
    m.acquire("k", owner("u1")).await.unwrap();
    assert!(!m.release("k", by("u2")).await.unwrap());
    assert!(m.release("k", by("u1")).await.unwrap());
    assert!(is_free(m, "k").await);
}

/// S4: anonymous locks are never re-entrant, resist named owners, and are
/// released by a caller that gives no owner.
pub async fn s4_anonymous_locks(f: &Fixture) {
    let m = &f.module;
    m.acquire("k", AcquireOptions::new()).await.unwrap();
    assert_contended(m.acquire("k", AcquireOptions::new()).await, "k");
    assert_contended(m.acquire("k", AcquireOptions::new()).await, "k");
    assert_contended(m.acquire("k", owner("u2")).await, "k");
    assert_contended(m.acquire("k", owner("u2")).await, "k");
    assert!(!m.release("k", by("u2")).await.unwrap());
    assert!(m.release("k", ReleaseOptions::new()).await.unwrap());
    assert!(is_free(m, "k").await);
}

/// S5: a failing job still releases the lock: the next execute runs.
pub async fn s5_execute_releases_after_job_error(f: &Fixture) {
    let m = &f.module;
    let calls = AtomicUsize::new(0);
    let r = m
        .execute("lock_key", ExecuteOptions::new(), |_| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>("job failed")
        })
        .await;
    assert_eq!(r.unwrap(), Err("job failed"));
    let r = m
        .execute(
            "lock_key",
            ExecuteOptions::new().timeout(Duration::ZERO),
            |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                "ok"
            },
        )
        .await;
    assert_eq!(r.unwrap(), "ok");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// S6: a holder runs past one waiter's timeout and within another's: the
/// first waiter fails with Medusa's message, its job never runs; the second
/// runs after the holder.
pub async fn s6_execute_waits_then_times_out(f: &Fixture) {
    let holding = Arc::new(Notify::new());
    let calls = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let m = f.module.clone();
    let (h, c) = (Arc::clone(&holding), Arc::clone(&calls));
    let fn_1 = tokio::spawn(async move {
        m.execute(
            "k",
            ExecuteOptions::new().timeout(Duration::from_secs(1)),
            |_| async move {
                c[0].fetch_add(1, Ordering::SeqCst);
                h.notify_one();
                sleep(Duration::from_millis(1500)).await;
                "fn_1"
            },
        )
        .await
    });
    holding.notified().await;
    let (m2, c2) = (f.peer.clone(), Arc::clone(&calls));
    let fn_2 = tokio::spawn(async move {
        m2.execute(
            "k",
            ExecuteOptions::new().timeout(Duration::from_secs(1)),
            |_| async move {
                c2[1].fetch_add(1, Ordering::SeqCst);
                "fn_2"
            },
        )
        .await
    });
    let (m3, c3) = (f.peer.clone(), Arc::clone(&calls));
    let fn_3 = tokio::spawn(async move {
        m3.execute(
            "k",
            ExecuteOptions::new().timeout(Duration::from_secs(5)),
            |_| async move {
                c3[2].fetch_add(1, Ordering::SeqCst);
                "fn_3"
            },
        )
        .await
    });
    assert_eq!(fn_1.await.unwrap().unwrap(), "fn_1");
    let e = fn_2.await.unwrap().unwrap_err();
    assert!(matches!(e, LockError::TimedOut { .. }), "{e:?}");
    assert_eq!(e.to_string(), "Timed-out acquiring lock.");
    assert_eq!(fn_3.await.unwrap().unwrap(), "fn_3");
    let counts: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(counts, [1, 0, 1]);
}

/// C1: every operation takes one key or a list of keys.
pub async fn c1_keys_as_one_string_or_a_list(f: &Fixture) {
    let m = &f.module;
    let one = m.acquire("a", owner("o")).await.unwrap();
    assert_eq!(one.keys(), ["a"]);
    let many = m.acquire(vec!["b", "c"], owner("o")).await.unwrap();
    assert_eq!(many.keys(), ["b", "c"]);
    let owned = m.acquire(vec!["d".to_string()], owner("o")).await.unwrap();
    assert_eq!(owned.keys(), ["d"]);
    assert!(m.release(["a", "b", "c", "d"], by("o")).await.unwrap());
    for k in ["a", "b", "c", "d"] {
        assert!(is_free(m, k).await);
    }
}

/// C2: in-memory is always there; one configured provider is the default;
/// with several, the last flagged wins; with several unflagged, in-memory.
pub async fn c2_default_provider_rules(f: &Fixture) {
    let p = &f.provider;
    let m = LockingModule::builder().build().unwrap();
    assert_eq!(m.default_provider_id(), "in-memory");
    let m = LockingModule::builder()
        .provider_arc("mine", Arc::clone(p), false)
        .build()
        .unwrap();
    assert_eq!(m.default_provider_id(), "mine");
    assert_eq!(m.provider_ids(), ["in-memory", "mine"]);
    let m = LockingModule::builder()
        .provider_arc("a", Arc::clone(p), true)
        .provider_arc("b", Arc::clone(p), false)
        .provider_arc("c", Arc::clone(p), true)
        .build()
        .unwrap();
    assert_eq!(m.default_provider_id(), "c");
    let m = LockingModule::builder()
        .provider_arc("a", Arc::clone(p), false)
        .provider_arc("b", Arc::clone(p), false)
        .build()
        .unwrap();
    assert_eq!(m.default_provider_id(), "in-memory");
    // Routing: a call naming "a" uses the provider under test, so the lock
    // is visible through the fixture's module.
    let lease = m.acquire("routed", owner("o").provider("a")).await.unwrap();
    assert_eq!(lease.provider_id(), "a");
    assert!(!is_free(&f.module, "routed").await);
    assert!(lease.release().await.unwrap());
    assert!(matches!(
        LockingModule::builder()
            .provider_arc("a", Arc::clone(p), false)
            .provider_arc("a", Arc::clone(p), false)
            .build(),
        Err(lockstep::ConfigError::DuplicateProvider { .. })
    ));
}

/// C3: an unknown provider id fails every operation with Medusa's message.
pub async fn c3_unknown_provider_is_a_typed_error(f: &Fixture) {
    let m = &f.module;
    let e = m
        .acquire("k", AcquireOptions::new().provider("nope"))
        .await
        .unwrap_err();
    assert!(matches!(&e, LockError::UnknownProvider { id } if id == "nope"));
    assert!(
        e.to_string()
            .starts_with("Unable to retrieve the locking provider with id: nope\nPlease make sure")
    );
    let e = m
        .execute("k", ExecuteOptions::new().provider("nope"), |_| async {})
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::UnknownProvider { .. }));
    assert!(
        m.release("k", ReleaseOptions::new().provider("nope"))
            .await
            .is_err()
    );
    assert!(
        m.release_all(ReleaseOptions::new().provider("nope"))
            .await
            .is_err()
    );
}

/// C4: the job runs only once every key is held, its result (and its own
/// error) comes back, and the keys are free afterwards.
pub async fn c4_execute_runs_after_all_keys_held_and_returns_the_result(f: &Fixture) {
    let m = &f.module;
    let peer = &f.peer;
    let r = m
        .execute(["x", "y"], ExecuteOptions::new(), |_| async {
            // Both keys are held while the job runs.
            assert!(!is_free(peer, "x").await);
            assert!(!is_free(peer, "y").await);
            7
        })
        .await
        .unwrap();
    assert_eq!(r, 7);
    assert!(is_free(m, "x").await && is_free(m, "y").await);
    let r: Result<Result<(), String>, LockError> = m
        .execute("x", ExecuteOptions::new(), |_| async {
            Err("boom".to_string())
        })
        .await;
    assert_eq!(r.unwrap().unwrap_err(), "boom");
    assert!(is_free(m, "x").await);
}

/// C5: at the timeout, execute fails with `Timed-out acquiring lock.` and
/// never runs the job.
pub async fn c5_execute_timeout_fails_without_running_the_job(f: &Fixture) {
    let m = &f.module;
    let _held = f.peer.acquire("k", owner("other")).await.unwrap();
    let ran = AtomicBool::new(false);
    let started = Instant::now();
    let e = m
        .execute(
            "k",
            ExecuteOptions::new().timeout(Duration::from_millis(300)),
            |_| async {
                ran.store(true, Ordering::SeqCst);
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, LockError::TimedOut { ref key } if key == "k"),
        "{e:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!ran.load(Ordering::SeqCst));
}

/// C6: each execute has its own owner (a nested execute on the same key is
/// not re-entrant, and no anonymous release frees it), and its lease does
/// not end with its acquisition timeout.
pub async fn c6_execute_owner_is_fresh_per_call_and_lease_is_not_the_timeout(f: &Fixture) {
    let m = &f.module;
    m.execute(
        "k",
        ExecuteOptions::new().timeout(Duration::from_millis(100)),
        |_| async {
            let nested = m
                .execute(
                    "k",
                    ExecuteOptions::new().timeout(Duration::ZERO),
                    |_| async {},
                )
                .await;
            assert!(
                matches!(nested, Err(LockError::Contended { .. })),
                "{nested:?}"
            );
            assert!(!m.release("k", ReleaseOptions::new()).await.unwrap());
            // Well past the 100 ms timeout, the lock is still held.
            sleep(Duration::from_millis(400)).await;
            assert!(!is_free(&f.peer, "k").await);
        },
    )
    .await
    .unwrap();
    assert!(is_free(m, "k").await);
}

/// C7: with a 300 ms lease and a job of 1.2 s, renewal keeps everyone else
/// out for the whole job (every key), and the keys are free afterwards.
pub async fn c7_execute_renews_its_lease_while_the_job_runs(f: &Fixture) {
    let m = &f.module;
    let peer = &f.peer;
    m.execute(
        ["r1", "r2"],
        ExecuteOptions::new().expire(Duration::from_millis(300)),
        |lost| async move {
            let end = Instant::now() + Duration::from_millis(1200);
            while Instant::now() < end {
                assert!(!is_free(peer, "r1").await, "r1 taken while the job ran");
                assert!(!is_free(peer, "r2").await, "r2 taken while the job ran");
                assert!(!lost.is_cancelled());
                sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await
    .unwrap();
    assert!(is_free(m, "r1").await && is_free(m, "r2").await);
}

/// C7: when the lock is taken away (here by `release_all`), the job's token
/// fires and execute fails with `Lost the lock for key(s) ...` even though
/// the job returned normally.
pub async fn c7_execute_signals_and_reports_a_lost_lease(f: &Fixture) {
    let m = &f.module;
    let peer = f.peer.clone();
    let r = m
        .execute(
            "lost",
            ExecuteOptions::new().expire(Duration::from_millis(300)),
            |lost| async move {
                peer.release_all(ReleaseOptions::new()).await.unwrap();
                timeout(Duration::from_secs(5), lost.cancelled())
                    .await
                    .expect("the cancellation token fires after the loss");
                "done anyway"
            },
        )
        .await;
    let e = r.unwrap_err();
    assert!(
        matches!(&e, LockError::LeaseLost { keys } if keys == &["lost"]),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "Lost the lock for key(s) lost");
}

/// C8 (and #16285): a timed-out multi-key execute leaves the free key free
/// and the held key with its holder.
pub async fn c8_timed_out_execute_leaves_nothing_held(f: &Fixture) {
    let m = &f.module;
    let busy = f.peer.acquire("busy", owner("other")).await.unwrap();
    let e = m
        .execute(
            ["free", "busy"],
            ExecuteOptions::new().timeout(Duration::from_millis(200)),
            |_| async {},
        )
        .await
        .unwrap_err();
    assert!(e.is_contended(), "{e:?}");
    assert!(is_free(m, "free").await);
    assert!(!is_free(m, "busy").await);
    assert!(busy.release().await.unwrap());
    m.execute("free", ExecuteOptions::new(), |_| async {})
        .await
        .unwrap();
}

/// C9: the error names the key that was held, in a multi-key request too.
pub async fn c9_failure_names_the_held_key(f: &Fixture) {
    let m = &f.module;
    m.acquire("b", owner("u1")).await.unwrap();
    let e = m.acquire(["a", "b", "c"], owner("u2")).await.unwrap_err();
    assert_eq!(e.to_string(), "Failed to acquire lock for key \"b\"");
}

/// C10: a new `expire` on re-entry resets the lease; without `expire` a
/// lock never expires.
pub async fn c10_expire_resets_on_reentry_and_no_expire_means_forever(f: &Fixture) {
    let m = &f.module;
    m.acquire("forever", owner("u")).await.unwrap();
    m.acquire("short", owner("u").expire(Duration::from_millis(300)))
        .await
        .unwrap();
    sleep(Duration::from_millis(200)).await;
    // Reset to 600 ms from now: still held at 500 ms after the first acquire.
    m.acquire("short", owner("u").expire(Duration::from_millis(600)))
        .await
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    assert!(
        !is_free(&f.peer, "short").await,
        "re-entry with expire must reset the lease"
    );
    super_eventually(Duration::from_secs(3), || is_free(&f.peer, "short")).await;
    assert!(!is_free(&f.peer, "forever").await);
    assert!(m.release("forever", by("u")).await.unwrap());
}

async fn super_eventually<F, Fut>(deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !check().await {
        assert!(
            Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// C11: releasing several keys is true only if all were released; the ones
/// the owner held are released anyway.
pub async fn c11_multi_key_release_reports_and_frees_what_it_can(f: &Fixture) {
    let m = &f.module;
    m.acquire(["a", "b"], owner("u1")).await.unwrap();
    m.acquire("c", owner("u2")).await.unwrap();
    assert!(
        !m.release(["a", "b", "c", "missing"], by("u1"))
            .await
            .unwrap()
    );
    assert!(is_free(m, "a").await && is_free(m, "b").await);
    assert!(!is_free(m, "c").await);
    assert!(m.release("c", by("u2")).await.unwrap());
}

/// C12: release_all with an owner frees exactly that owner's locks.
pub async fn c12_release_all_with_owner_frees_exactly_its_locks(f: &Fixture) {
    let m = &f.module;
    m.acquire(["a1", "a2"], owner("u1")).await.unwrap();
    m.acquire("a3", owner("u1").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    m.acquire("b1", owner("u2")).await.unwrap();
    m.acquire("anon", AcquireOptions::new()).await.unwrap();
    assert_eq!(m.release_all(by("u1")).await.unwrap(), 3);
    for k in ["a1", "a2", "a3"] {
        assert!(is_free(m, k).await, "{k}");
    }
    assert!(!is_free(m, "b1").await);
    assert!(!is_free(m, "anon").await);
    assert_eq!(m.release_all(by("u1")).await.unwrap(), 0);
}

/// #16285, Q7: a multi-key acquire that meets one held key takes none.
pub async fn d_multi_key_acquire_is_all_or_nothing(f: &Fixture) {
    let m = &f.module;
    m.acquire("b", owner("holder")).await.unwrap();
    assert_contended(m.acquire(["a", "b", "c"], owner("u")).await, "b");
    assert!(is_free(m, "a").await && is_free(m, "c").await);
    let e = m
        .acquire(
            ["a", "b", "c"],
            owner("u").timeout(Duration::from_millis(150)),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::TimedOut { .. }));
    assert!(is_free(m, "a").await && is_free(m, "c").await);
}

/// #16285, Q9: two tasks taking [a, b] and [b, a] in a loop, with waits,
/// never deadlock, and leave nothing behind.
pub async fn d_opposite_orders_never_deadlock(f: &Fixture) {
    let rounds = 40;
    let run = |m: LockingModule, keys: [&'static str; 2]| async move {
        let mut timeouts = 0;
        for i in 0..rounds {
            let o = format!("{}-{i}", keys[0]);
            match m
                .acquire(
                    keys,
                    owner(&o)
                        .expire(Duration::from_secs(10))
                        .timeout(Duration::from_millis(500)),
                )
                .await
            {
                Ok(lease) => {
                    tokio::task::yield_now().await;
                    assert!(lease.release().await.unwrap());
                }
                Err(e) if e.is_contended() => timeouts += 1,
                Err(e) => panic!("{e}"),
            }
        }
        timeouts
    };
    let ab = tokio::spawn(run(f.module.clone(), ["a", "b"]));
    let ba = tokio::spawn(run(f.peer.clone(), ["b", "a"]));
    let done = timeout(Duration::from_secs(60), async {
        (ab.await.unwrap(), ba.await.unwrap())
    })
    .await
    .expect("no deadlock");
    assert!(done.0 + done.1 < rounds, "most rounds succeed: {done:?}");
    assert!(is_free(&f.module, "a").await && is_free(&f.module, "b").await);
}

/// Medusa's unreleased fix: `["A", "A"]` takes A once, with one token, and
/// one release frees it. Anonymous too (it would otherwise conflict with
/// itself).
pub async fn d_duplicate_keys_are_taken_once(f: &Fixture) {
    let m = &f.module;
    let lease = m
        .acquire(["A", "A", "B", "A"], AcquireOptions::new())
        .await
        .unwrap();
    assert_eq!(lease.keys(), ["A", "B"]);
    assert_eq!(lease.fencing_tokens().count(), 2);
    assert!(lease.release().await.unwrap());
    assert!(is_free(m, "A").await && is_free(m, "B").await);
}

/// Q10: a zero timeout is one attempt, not a one-second wait; a waiting
/// acquire ends at its own deadline.
pub async fn d_zero_timeout_is_one_attempt_and_waits_are_bounded(f: &Fixture) {
    let m = &f.module;
    f.peer.acquire("k", owner("other")).await.unwrap();
    let started = Instant::now();
    let e = m
        .execute(
            "k",
            ExecuteOptions::new().timeout(Duration::ZERO),
            |_| async {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::Contended { .. }), "{e:?}");
    assert_contended(
        m.acquire("k", owner("u").timeout(Duration::ZERO)).await,
        "k",
    );
    // Far below Medusa's 1 s clamp, with a generous margin for a slow machine.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let e = m
        .acquire("k", owner("u").timeout(Duration::from_millis(250)))
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::TimedOut { .. }));
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// Q6: leases have millisecond precision: 200 ms is 200 ms, not 1 s, and
/// 1.5 s is fine (Medusa's Redis provider fails on fractional seconds).
pub async fn d_millisecond_leases(f: &Fixture) {
    let m = &f.module;
    let started = Instant::now();
    m.acquire("ms", owner("u").expire(Duration::from_millis(200)))
        .await
        .unwrap();
    m.acquire("frac", owner("u").expire(Duration::from_millis(1500)))
        .await
        .unwrap();
    super_eventually(Duration::from_secs(3), || is_free(&f.peer, "ms")).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "freed after {:?}",
        started.elapsed()
    );
    assert!(!is_free(&f.peer, "frac").await || started.elapsed() >= Duration::from_millis(1500));
}

/// Q5: an expired lock can be taken by anyone, and its former owner's
/// release then returns false without touching the new holder.
pub async fn d_expired_lock_is_free_for_anyone(f: &Fixture) {
    let m = &f.module;
    m.acquire("k", owner("old").expire(Duration::from_millis(100)))
        .await
        .unwrap();
    let lease = m
        .acquire("k", owner("new").timeout(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(!m.release("k", by("old")).await.unwrap());
    assert!(!is_free(m, "k").await);
    assert!(lease.release().await.unwrap());
}

/// Q2: a release without an owner frees only anonymous locks.
pub async fn d_release_without_owner_frees_only_anonymous_locks(f: &Fixture) {
    let m = &f.module;
    m.acquire("owned", owner("u1")).await.unwrap();
    m.acquire("anon", AcquireOptions::new()).await.unwrap();
    assert!(!m.release("owned", ReleaseOptions::new()).await.unwrap());
    assert!(!is_free(m, "owned").await);
    assert!(m.release("anon", ReleaseOptions::new()).await.unwrap());
    assert!(
        !m.release("anon", by("u1")).await.unwrap(),
        "already released"
    );
}

/// Q1: release_all without an owner frees every lock of the provider, owned
/// or anonymous, with or without expiry.
pub async fn d_release_all_without_owner_frees_everything(f: &Fixture) {
    let m = &f.module;
    m.acquire("u1", owner("u1")).await.unwrap();
    m.acquire("u2", owner("u2").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    m.acquire("anon", AcquireOptions::new()).await.unwrap();
    assert_eq!(m.release_all(ReleaseOptions::new()).await.unwrap(), 3);
    for k in ["u1", "u2", "anon"] {
        assert!(is_free(m, k).await, "{k}");
    }
}

/// Q3: re-entry without `expire` keeps the current lease: it neither
/// removes the expiry (Medusa's Redis bug) nor extends it.
pub async fn d_reentry_without_expire_keeps_the_lease(f: &Fixture) {
    let m = &f.module;
    let started = Instant::now();
    m.acquire("k", owner("u").expire(Duration::from_millis(300)))
        .await
        .unwrap();
    let again = m.acquire("k", owner("u")).await.unwrap();
    assert!(again.was_reentered("k"));
    super_eventually(Duration::from_secs(3), || is_free(&f.peer, "k")).await;
    assert!(started.elapsed() < Duration::from_millis(2000));
}

/// Q4: an owner waiting for its own lock does not spin or wait: re-entry
/// succeeds at once, even with a timeout.
pub async fn d_same_owner_never_waits_for_itself(f: &Fixture) {
    let m = &f.module;
    m.acquire("k", owner("u")).await.unwrap();
    let started = Instant::now();
    let lease = m
        .acquire("k", owner("u").timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(lease.was_reentered("k"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Weakness 16: an owner named like Medusa's anonymous marker `*` is an
/// ordinary owner; an empty owner is rejected rather than turned anonymous.
pub async fn d_no_owner_id_collides_with_the_anonymous_marker(f: &Fixture) {
    let m = &f.module;
    m.acquire("k", AcquireOptions::new()).await.unwrap();
    assert_contended(m.acquire("k", owner("*")).await, "k");
    assert!(!m.release("k", by("*")).await.unwrap());
    assert!(m.release("k", ReleaseOptions::new()).await.unwrap());
    m.acquire("k", owner("*")).await.unwrap();
    m.acquire("k", owner("*")).await.unwrap(); // re-entrant, unlike anonymous
    assert!(!m.release("k", ReleaseOptions::new()).await.unwrap());
    assert!(m.release("k", by("*")).await.unwrap());
    let e = m.acquire("k", owner("")).await.unwrap_err();
    assert!(matches!(
        e,
        LockError::InvalidInput(InvalidInput::EmptyOwner)
    ));
}

/// Weakness 2: fencing tokens grow strictly with every acquisition of a
/// key, across release, expiry and re-entry, and per key of a multi-key
/// lease.
pub async fn d_fencing_tokens_grow_across_release_expiry_and_reentry(f: &Fixture) {
    let m = &f.module;
    let mut last = 0;
    let mut check = |t: u64| {
        assert!(t > last, "token {t} after {last}");
        last = t;
    };
    let l = m.acquire("f", owner("a")).await.unwrap();
    check(l.fencing_token());
    let l2 = m.acquire("f", owner("a")).await.unwrap(); // re-entry
    check(l2.fencing_token());
    assert!(l2.release().await.unwrap());
    let l = f
        .peer
        .acquire("f", owner("b").expire(Duration::from_millis(50)))
        .await
        .unwrap();
    check(l.fencing_token());
    let l = m
        .acquire("f", owner("c").timeout(Duration::from_secs(3)))
        .await
        .unwrap(); // after expiry
    check(l.fencing_token());
    assert!(l.release().await.unwrap());
    let multi = m.acquire(["f", "g"], owner("d")).await.unwrap();
    check(multi.token_of("f").unwrap());
    assert!(multi.token_of("g").unwrap() > 0);
    assert_eq!(multi.token_of("h"), None);
    assert!(multi.release().await.unwrap());
    let after_release_all = {
        m.acquire("f", owner("e")).await.unwrap();
        m.release_all(ReleaseOptions::new()).await.unwrap();
        m.acquire("f", owner("e")).await.unwrap()
    };
    assert!(after_release_all.fencing_token() > last + 1);
}

/// Weakness 1: a waiter gets the lock once it is released, well before its
/// own deadline.
pub async fn d_waiter_wakes_on_release(f: &Fixture) {
    let m = &f.module;
    let held = f.peer.acquire("w", owner("holder")).await.unwrap();
    let waiter = {
        let m = m.clone();
        tokio::spawn(async move {
            m.acquire("w", owner("waiter").timeout(Duration::from_secs(10)))
                .await
        })
    };
    sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    assert!(held.release().await.unwrap());
    let lease = timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken well before its 10 s deadline")
        .unwrap()
        .unwrap();
    assert_eq!(lease.owner_id(), Some("waiter"));
}

/// A waiter also wakes when the holder's lease runs out (Medusa's
/// in-memory waiters do not).
pub async fn d_waiter_wakes_on_expiry(f: &Fixture) {
    let m = &f.module;
    f.peer
        .acquire("e", owner("holder").expire(Duration::from_millis(200)))
        .await
        .unwrap();
    let lease = timeout(
        Duration::from_secs(5),
        m.acquire("e", owner("waiter").timeout(Duration::from_secs(10))),
    )
    .await
    .expect("woken by the expiry, well before the 10 s deadline")
    .unwrap();
    assert_eq!(lease.owner_id(), Some("waiter"));
}

/// Weakness 3: leases can be extended explicitly, by their owner only.
pub async fn d_extend_is_owner_checked(f: &Fixture) {
    let m = &f.module;
    let mut lease = m
        .acquire(["x", "y"], owner("u").expire(Duration::from_millis(300)))
        .await
        .unwrap();
    lease.extend(Duration::from_secs(30)).await.unwrap();
    sleep(Duration::from_millis(500)).await;
    assert!(!is_free(&f.peer, "x").await && !is_free(&f.peer, "y").await);
    let e = m
        .extend(
            ["x", "y"],
            ExtendOptions::new(Duration::from_secs(1)).owner_id("intruder"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, LockError::NotOwner { ref key } if key == "x"),
        "{e:?}"
    );
    m.release("y", by("u")).await.unwrap();
    let e = lease.extend(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(e, LockError::NotOwner { ref key } if key == "y"),
        "{e:?}"
    );
    assert!(
        !is_free(&f.peer, "x").await,
        "a failed extend changes nothing"
    );
    let e = lease.extend(Duration::ZERO).await.unwrap_err();
    assert!(matches!(e, LockError::InvalidInput(_)));
    assert!(!lease.release().await.unwrap(), "y was already released");
}

/// A panicking job releases its locks, and the panic reaches the caller.
pub async fn d_execute_releases_when_the_job_panics(f: &Fixture) {
    let m = f.module.clone();
    let r = tokio::spawn(async move {
        m.execute("p", ExecuteOptions::new(), |_| async {
            panic!("job panicked");
        })
        .await
    })
    .await;
    assert!(r.unwrap_err().is_panic());
    assert!(is_free(&f.module, "p").await);
}

/// Bad input is a typed error, and leaves nothing held.
pub async fn d_bad_input_is_a_typed_error_and_holds_nothing(f: &Fixture) {
    let m = &f.module;
    let empty: Vec<String> = vec![];
    let cases: Vec<(Result<lockstep::Lease, LockError>, InvalidInput)> = vec![
        (
            m.acquire(empty.clone(), owner("u")).await,
            InvalidInput::NoKeys,
        ),
        (
            m.acquire(["ok", ""], owner("u")).await,
            InvalidInput::EmptyKey,
        ),
        (
            m.acquire("ok", owner("u").expire(Duration::ZERO)).await,
            InvalidInput::ZeroDuration { what: "expire" },
        ),
    ];
    for (r, want) in cases {
        match r {
            Err(LockError::InvalidInput(got)) => assert_eq!(got, want),
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
    let absurd = m
        .acquire("ok", owner("u").expire(Duration::MAX))
        .await
        .unwrap_err();
    assert!(matches!(
        absurd,
        LockError::InvalidInput(InvalidInput::DurationTooLong { .. })
    ));
    let absurd = m
        .acquire(
            "ok",
            owner("u").timeout(Duration::from_secs(10 * 365 * 86400)),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        absurd,
        LockError::InvalidInput(InvalidInput::DurationTooLong { .. })
    ));
    let long = "k".repeat(lockstep::MAX_KEY_LEN + 1);
    assert!(matches!(
        m.acquire(long.as_str(), owner("u")).await.unwrap_err(),
        LockError::InvalidInput(InvalidInput::KeyTooLong { .. })
    ));
    let e = m
        .execute(
            "ok",
            ExecuteOptions::new().expire(Duration::ZERO),
            |_| async {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LockError::InvalidInput(_)));
    assert!(matches!(
        m.release(empty, ReleaseOptions::new()).await,
        Err(LockError::InvalidInput(_))
    ));
    assert!(is_free(m, "ok").await);
}

/// A lease knows which keys it took and which it re-entered, and releases
/// exactly through its owner.
pub async fn d_lease_release_and_newly_acquired_keys(f: &Fixture) {
    let m = &f.module;
    m.acquire("held", owner("u")).await.unwrap();
    let lease = m
        .acquire(["held", "new"], owner("u").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(lease.newly_acquired().collect::<Vec<_>>(), ["new"]);
    assert!(lease.was_reentered("held") && !lease.was_reentered("new"));
    assert!(lease.valid_until().is_some());
    assert_eq!(lease.owner_id(), Some("u"));
    assert!(lease.release().await.unwrap());
    assert!(is_free(m, "held").await && is_free(m, "new").await);
}
