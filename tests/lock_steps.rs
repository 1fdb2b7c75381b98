//! `acquire_lock_step` and `release_lock_step`, on the in-memory provider and
//! on Redis (where "free" is checked in Redis itself, not through lockstep).

mod support;

use std::time::Duration;

use lockstep::workflow::{
    AcquireLockInput, AcquiredLock, Container, ReleaseLockInput, StepError, Workflow,
    acquire_lock_step, create_step, create_workflow, release_lock_step,
};
use lockstep::{AcquireOptions, LockError, LockingModule, RedisProvider};
use redis::AsyncCommands;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep};

/// A locking module and a way to look at the backend directly.
struct Harness {
    module: LockingModule,
    redis: Option<(RedisProvider, redis::aio::MultiplexedConnection)>,
}

impl Harness {
    fn memory() -> Harness {
        Harness {
            module: LockingModule::new(),
            redis: None,
        }
    }

    async fn redis() -> Harness {
        let provider = support::redis_provider().await;
        let conn = support::raw_connection(&support::shared_url()).await;
        Harness {
            module: support::module_with(provider.clone()),
            redis: Some((provider, conn)),
        }
    }

    fn container(&self) -> Container {
        Container::with_locking(self.module.clone())
    }

    /// Whether `key` is held: for Redis, whether its key exists in Redis.
    async fn held(&self, key: &str) -> bool {
        match &self.redis {
            Some((p, c)) => {
                let mut c = c.clone();
                c.exists(p.lock_key(key)).await.unwrap()
            }
            None => match self
                .module
                .acquire(key, AcquireOptions::new().owner_id("probe"))
                .await
            {
                Ok(lease) => {
                    lease.release().await.unwrap();
                    false
                }
                Err(e) if e.is_contended() => true,
                Err(e) => panic!("{e}"),
            },
        }
    }
}

/// Runs each case on both providers.
macro_rules! on_both_providers {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { super::$case(super::Harness::memory()).await }
            )*
        }
        mod redis_provider {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { super::$case(super::Harness::redis().await).await }
            )*
        }
    };
}

on_both_providers!(
    a_failure_after_the_acquire_step_leaves_the_key_free,
    the_owner_defaults_to_the_root_run_and_tokens_are_exposed,
    timeout_zero_is_one_attempt,
    the_step_retries_until_its_timeout,
    the_step_gets_a_lock_released_during_its_timeout,
    a_compensation_of_run_a_never_frees_run_bs_lock,
    a_sub_workflow_reenters_its_parents_keys_and_really_locks_others,
    execute_on_sub_workflow_locks_as_the_sub_workflow,
    release_step_reports_and_never_fails_on_false,
    empty_keys_are_a_no_op,
);

/// acquire(order) -> charge (fails) -> release: the compensation frees the key.
fn failing_checkout() -> Workflow<String, ()> {
    let charge = create_step("charge", |_ctx, _order: String| async move {
        Err::<(), StepError>("card declined".into())
    });
    create_workflow("checkout", move |run, order: String| {
        let charge = charge.clone();
        async move {
            run.step(
                &acquire_lock_step(),
                AcquireLockInput::new(order.as_str()).ttl(Duration::from_secs(30)),
            )
            .await?;
            run.step(&charge, order.clone()).await?;
            run.step(&release_lock_step(), ReleaseLockInput::new(order.as_str()))
                .await?;
            Ok(())
        }
    })
}

/// A step failing after the acquire step leaves the key free.
async fn a_failure_after_the_acquire_step_leaves_the_key_free(h: Harness) {
    let e = failing_checkout()
        .run(&h.container(), "order_1".into())
        .await
        .unwrap_err();
    assert_eq!(e.error().to_string(), "card declined");
    assert_eq!(e.compensated, ["acquire-lock-step"]);
    assert!(
        !h.held("order_1").await,
        "the compensation released the lock"
    );
}

/// The owner is the root run's id, not an anonymous lock.
async fn the_owner_defaults_to_the_root_run_and_tokens_are_exposed(h: Harness) {
    let wf = create_workflow("lock-and-keep", |run, key: String| async move {
        let lock: AcquiredLock = run
            .step(&acquire_lock_step(), AcquireLockInput::new(key.as_str()))
            .await?;
        Ok(lock)
    });
    let done = wf.run(&h.container(), "k".into()).await.unwrap();
    assert_eq!(done.output.owner_id, done.run_id);
    assert!(done.output.token_of("k").unwrap() > 0);
    assert!(h.held("k").await);
    // An anonymous release cannot free it; its owner can.
    assert!(
        !h.module
            .release("k", lockstep::ReleaseOptions::new())
            .await
            .unwrap()
    );
    assert!(
        h.module
            .release("k", lockstep::ReleaseOptions::new().owner_id(&done.run_id))
            .await
            .unwrap()
    );
}

fn lock_once(timeout: Duration, retry: Duration) -> Workflow<String, AcquiredLock> {
    create_workflow("lock", move |run, key: String| async move {
        run.step(
            &acquire_lock_step(),
            AcquireLockInput::new(key.as_str())
                .timeout(timeout)
                .retry_interval(retry)
                .ttl(Duration::from_secs(30)),
        )
        .await
    })
}

/// Timeout zero (the default): one attempt, failing at once with the
/// provider's message.
async fn timeout_zero_is_one_attempt(h: Harness) {
    h.module
        .acquire("busy", AcquireOptions::new().owner_id("other"))
        .await
        .unwrap();
    let started = Instant::now();
    let e = lock_once(Duration::ZERO, Duration::from_millis(300))
        .run(&h.container(), "busy".into())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(e.lock_error(), Some(LockError::Contended { key }) if key == "busy"),
        "{e}"
    );
    assert_eq!(
        e.error().to_string(),
        "Failed to acquire lock for key \"busy\""
    );
}

/// With a timeout, the step keeps trying until it runs out, then fails
/// with the provider's message.
async fn the_step_retries_until_its_timeout(h: Harness) {
    h.module
        .acquire("busy", AcquireOptions::new().owner_id("other"))
        .await
        .unwrap();
    let started = Instant::now();
    let e = lock_once(Duration::from_millis(600), Duration::from_millis(100))
        .run(&h.container(), "busy".into())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(600), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        e.error().to_string(),
        "Failed to acquire lock for key \"busy\""
    );
}

/// A lock released while the step waits is taken before the timeout.
async fn the_step_gets_a_lock_released_during_its_timeout(h: Harness) {
    let held = h
        .module
        .acquire("busy", AcquireOptions::new().owner_id("other"))
        .await
        .unwrap();
    let wf = lock_once(Duration::from_secs(10), Duration::from_millis(300));
    let container = h.container();
    let waiting = tokio::spawn(async move { wf.run(&container, "busy".into()).await });
    sleep(Duration::from_millis(150)).await;
    assert!(!waiting.is_finished());
    assert!(held.release().await.unwrap());
    let done = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("taken well before the 10 s timeout")
        .unwrap()
        .unwrap();
    assert_eq!(done.output.keys, ["busy"]);
}

/// Run A's lease runs out and run B takes the key; when A then fails, its
/// compensation must not free B's lock.
async fn a_compensation_of_run_a_never_frees_run_bs_lock(h: Harness) {
    let (holds_tx, holds_rx) = oneshot::channel::<()>();
    let (expired_tx, expired_rx) = oneshot::channel::<()>();
    let channels = std::sync::Arc::new(tokio::sync::Mutex::new(Some((holds_tx, expired_rx))));
    let wait_then_fail = create_step("wait-then-fail", move |_ctx, _: ()| {
        let channels = std::sync::Arc::clone(&channels);
        async move {
            let (holds, expired) = channels.lock().await.take().expect("runs once");
            holds.send(()).unwrap();
            expired.await.expect("B took the lock");
            Err::<(), StepError>("A failed late".into())
        }
    });
    let run_a = create_workflow("a", move |run, key: String| {
        let step = wait_then_fail.clone();
        async move {
            run.step(
                &acquire_lock_step(),
                AcquireLockInput::new(key.as_str()).ttl(Duration::from_millis(200)),
            )
            .await?;
            run.step(&step, ()).await
        }
    });
    let container = h.container();
    let a = tokio::spawn(async move { run_a.run(&container, "contested".into()).await });
    holds_rx.await.expect("A holds the lock");
    // B waits for A's lease to run out, then holds the key.
    let b = lock_once(Duration::from_secs(10), Duration::from_millis(50))
        .run(&h.container(), "contested".into())
        .await
        .unwrap();
    expired_tx.send(()).unwrap();
    let e = a.await.unwrap().unwrap_err();
    assert_eq!(e.compensated, ["acquire-lock-step"]);
    assert!(
        h.held("contested").await,
        "B's lock survived A's compensation"
    );
    assert!(
        h.module
            .release(
                "contested",
                lockstep::ReleaseOptions::new().owner_id(&b.run_id)
            )
            .await
            .unwrap()
    );
}

/// A sub-workflow locks with its parent's owner: the parent's key is
/// re-entered, a new key is really locked; the sub-workflow's release and
/// compensation leave the parent's hold alone.
async fn a_sub_workflow_reenters_its_parents_keys_and_really_locks_others(h: Harness) {
    let fail = create_step("fail", |_ctx, _: ()| async move {
        Err::<(), StepError>("sub failed".into())
    });
    let sub_ok = create_workflow("sub-ok", |run, keys: Vec<String>| async move {
        let lock = run
            .step(
                &acquire_lock_step(),
                AcquireLockInput::new(keys.clone()).ttl(Duration::from_secs(30)),
            )
            .await?;
        run.step(&release_lock_step(), ReleaseLockInput::new(keys))
            .await?;
        Ok(lock)
    });
    let sub_fail = create_workflow("sub-fail", move |run, keys: Vec<String>| {
        let fail = fail.clone();
        async move {
            run.step(
                &acquire_lock_step(),
                AcquireLockInput::new(keys).ttl(Duration::from_secs(30)),
            )
            .await?;
            run.step(&fail, ()).await
        }
    });
    let probe = h.module.clone();
    let parent = create_workflow("parent", move |run, _: ()| {
        let (sub_ok, sub_fail, probe) = (sub_ok.clone(), sub_fail.clone(), probe.clone());
        async move {
            run.step(
                &acquire_lock_step(),
                AcquireLockInput::new("cart").ttl(Duration::from_secs(30)),
            )
            .await?;
            let keys = vec!["cart".to_string(), "item".to_string()];
            let lock = run.run_sub(&sub_ok, keys.clone()).await?;
            assert_eq!(lock.reentered, [true, false]);
            assert_eq!(lock.owner_id, run.root_id());
            // The sub-workflow's release freed "item" only.
            assert!(
                probe
                    .acquire("item", AcquireOptions::new().owner_id("x"))
                    .await
                    .is_ok()
            );
            probe
                .release("item", lockstep::ReleaseOptions::new().owner_id("x"))
                .await?;
            assert!(
                probe
                    .acquire("cart", AcquireOptions::new().owner_id("x"))
                    .await
                    .is_err()
            );
            // A failing sub-workflow: its compensation frees "item", not "cart".
            assert!(run.run_sub(&sub_fail, keys).await.is_err());
            assert!(
                probe
                    .acquire("cart", AcquireOptions::new().owner_id("x"))
                    .await
                    .is_err()
            );
            run.step(&release_lock_step(), ReleaseLockInput::new("cart"))
                .await?;
            Ok(())
        }
    });
    parent.run(&h.container(), ()).await.unwrap();
    assert!(!h.held("cart").await && !h.held("item").await);
}

/// With `execute_on_sub_workflow`, a sub-workflow locks as itself: the
/// parent's key is then really contended.
async fn execute_on_sub_workflow_locks_as_the_sub_workflow(h: Harness) {
    let sub = create_workflow("own", |run, key: String| async move {
        run.step(
            &acquire_lock_step(),
            AcquireLockInput::new(key.as_str()).execute_on_sub_workflow(true),
        )
        .await
    });
    let parent = create_workflow("parent", move |run, key: String| {
        let sub = sub.clone();
        async move {
            run.step(&acquire_lock_step(), AcquireLockInput::new(key.as_str()))
                .await?;
            let r = run.run_sub(&sub, key.clone()).await;
            run.step(&release_lock_step(), ReleaseLockInput::new(key.as_str()))
                .await?;
            r
        }
    });
    let e = parent.run(&h.container(), "k".into()).await.unwrap_err();
    assert!(
        matches!(e.lock_error(), Some(LockError::Contended { .. })),
        "{e}"
    );
    assert!(!h.held("k").await);
}

/// The release step returns false for a key it does not hold, and does not
/// fail.
async fn release_step_reports_and_never_fails_on_false(h: Harness) {
    h.module
        .acquire("theirs", AcquireOptions::new().owner_id("other"))
        .await
        .unwrap();
    let wf = create_workflow("release", |run, key: String| async move {
        run.step(&release_lock_step(), ReleaseLockInput::new(key.as_str()))
            .await
    });
    let done = wf.run(&h.container(), "theirs".into()).await.unwrap();
    assert!(!done.output);
    assert!(h.held("theirs").await);
}

/// No keys: the acquire step does nothing, the release step returns true.
async fn empty_keys_are_a_no_op(h: Harness) {
    let wf = create_workflow("empty", |run, _: ()| async move {
        let none: Vec<String> = vec![];
        let lock = run
            .step(&acquire_lock_step(), AcquireLockInput::new(none.clone()))
            .await?;
        assert!(lock.keys.is_empty());
        run.step(&release_lock_step(), ReleaseLockInput::new(none))
            .await
    });
    assert!(wf.run(&h.container(), ()).await.unwrap().output);
}

/// Waits until the Redis queue of lock `k` in namespace `ns` has `n`
/// processes.
async fn queue_holds(ns: &str, n: usize) {
    let queue = format!("{ns}{{k}}:q");
    support::eventually(Duration::from_secs(5), "the callers queued", || async {
        let mut c = support::raw_connection(&support::shared_url()).await;
        c.llen::<_, usize>(&queue).await.unwrap() == n
    })
    .await;
}

/// Finding 4 (the step): a waiting acquire step keeps its place in line for
/// its whole timeout. It used to start a new wait every `retry_interval`
/// (0.3 s), going to the back of the Redis queue each time, so a caller
/// that came later was served first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_keeps_its_place_in_line() {
    let ns = support::unique_namespace();
    let provider = || async { support::module_with(support::redis_provider_in(&ns).await) };
    let (p1, p2, p3) = (provider().await, provider().await, provider().await);
    p1.acquire("k", AcquireOptions::new().owner_id("holder"))
        .await
        .unwrap();
    // The step's workflow takes k, notes when, and releases it.
    let step_and_release = create_workflow("lock-and-release", |run, key: String| async move {
        run.step(
            &acquire_lock_step(),
            AcquireLockInput::new(key.as_str())
                .timeout(Duration::from_secs(5))
                .retry_interval(Duration::from_millis(300)),
        )
        .await?;
        let at = Instant::now();
        run.step(&release_lock_step(), ReleaseLockInput::new(key.as_str()))
            .await?;
        Ok(at)
    });
    let step_done = tokio::spawn(async move {
        step_and_release
            .run(&Container::with_locking(p2), "k".into())
            .await
            .map(|done| done.output)
    });
    // Queued, then waiting past a retry interval (where it used to go to
    // the back of the line) before the later caller comes.
    queue_holds(&ns, 1).await;
    sleep(Duration::from_millis(400)).await;
    let later_done = tokio::spawn(async move {
        let lease = p3
            .acquire(
                "k",
                AcquireOptions::new()
                    .owner_id("later")
                    .timeout(Duration::from_secs(5)),
            )
            .await?;
        let at = Instant::now();
        lease.release().await.map(|_| at)
    });
    // Both queued, and the step past another retry interval.
    queue_holds(&ns, 2).await;
    sleep(Duration::from_millis(400)).await;
    assert!(
        p1.release("k", lockstep::ReleaseOptions::new().owner_id("holder"))
            .await
            .unwrap()
    );
    let step = step_done.await.unwrap().expect("the step gets k");
    let later = later_done.await.unwrap().expect("the later caller gets k");
    assert!(step < later, "a caller that came later was served first");
}
