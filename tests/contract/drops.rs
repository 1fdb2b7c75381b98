//! Dropping every public future at every await: for each operation, the
//! future is polled k times (each poll when its own waker fires, so real
//! I/O happens in between) and dropped, for k = 0, 1, 2, ... until it
//! completes undisturbed. After every drop:
//!
//! - the keys can be taken by another owner within the lease plus a small
//!   bound (a dropped acquisition is undone, a dropped release can be
//!   repeated, a dropped `execute` or workflow releases in the background);
//! - the other waiters still get the lock, before their deadlines, and in
//!   arrival order where the provider promises it;
//! - the provider's in-process registries are back to their size before,
//!   and the backend keeps nothing but fencing counters (named in the
//!   failure message otherwise).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockstep::workflow::{
    AcquireLockInput, Container, ReleaseLockInput, StepError, acquire_lock_step, create_step,
    create_workflow, release_lock_step,
};
use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, InspectOptions, ListOptions, LockingModule,
    ReleaseOptions,
};
use lockstep_testkit::{every_poll, poll_then_drop};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::{Fixture, is_free};

/// How long a drop may leave something behind before it is a leak: a
/// background undo or release takes a round trip, retried after a backoff.
const SETTLE: Duration = Duration::from_secs(3);

/// How long a waiter of these cases waits at most.
const WAIT: Duration = Duration::from_secs(5);

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

fn by(o: &str) -> ReleaseOptions {
    ReleaseOptions::new().owner_id(o)
}

/// What the fixture keeps before a case: the registries must come back to
/// it, and the backend to nothing but counters.
async fn baseline(f: &Fixture) -> (usize, Vec<String>) {
    ((f.residue.local)(), (f.residue.stored)().await)
}

/// Waits until the fixture keeps no more than `base` did.
async fn settled(f: &Fixture, base: &(usize, Vec<String>), what: &str) {
    let end = Instant::now() + SETTLE;
    loop {
        let local = (f.residue.local)();
        let stored = (f.residue.stored)().await;
        if local <= base.0 && stored == base.1 {
            return;
        }
        if Instant::now() >= end {
            panic!(
                "{what}: left behind after {SETTLE:?}: {local} registry entries (was {}), \
                 stored {stored:?} (was {:?})",
                base.0, base.1
            );
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `key` can be taken by a fresh owner.
async fn becomes_free(m: &LockingModule, key: &str, within: Duration, what: &str) {
    let end = Instant::now() + within;
    while !is_free(m, key).await {
        assert!(
            Instant::now() < end,
            "{what}: {key} still held after {within:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// A waiter on `key`, timed: when it got the lock (it releases at once).
fn waiter(m: &LockingModule, key: &str, who: &str) -> JoinHandle<Instant> {
    let (m, key, who) = (m.clone(), key.to_owned(), who.to_owned());
    tokio::spawn(async move {
        let lease = m
            .acquire(key.as_str(), owner(&who).timeout(WAIT))
            .await
            .unwrap_or_else(|e| panic!("waiter {who} on {key}: {e}"));
        let at = Instant::now();
        lease.release().await.expect("the waiter's release");
        at
    })
}

/// Releases `lease` (any lease type's release future) after `after`, in a
/// task of its own: the waits of these cases end on their own.
fn release_later<F>(after: Duration, release: F) -> JoinHandle<()>
where
    F: Future + Send + 'static,
{
    tokio::spawn(async move {
        sleep(after).await;
        release.await;
    })
}

/// Waits until a waiter is registered (a local one) or has had time to
/// queue (a peer's, as another process's would).
async fn queued(f: &Fixture, before: usize) {
    let end = Instant::now() + Duration::from_millis(50);
    while (f.residue.local)() <= before && Instant::now() < end {
        sleep(Duration::from_millis(2)).await;
    }
    sleep(Duration::from_millis(20)).await;
}

/// `acquire` of a free key (a lease and no expiry: the worst case),
/// dropped at every poll: nothing stays held, or it is undone.
pub async fn drop_acquire_of_a_free_key(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("acquire, free key", |k| async move {
        let key = format!("free-{k}");
        let acquire = f.module.acquire(key.as_str(), owner("victim"));
        let done = poll_then_drop(acquire, k).await;
        let completed = done.is_some();
        if let Some(lease) = done {
            assert!(lease.unwrap().release().await.unwrap());
        }
        becomes_free(&f.peer, &key, SETTLE, &format!("acquire dropped at {k}")).await;
        settled(f, base, &format!("acquire dropped at {k}")).await;
        completed
    })
    .await;
}

/// A waiting `acquire` dropped at every poll, with a holder (another
/// process) that lets go soon, and two waiters behind it (one local, one
/// in the other process): they get the lock before their deadlines, in
/// order where the provider is fair, and nothing is left behind.
///
/// Order means the order in which their processes queued in Redis. It is
/// checked when it is known: the local waiter joined while the dropped one
/// still waited (so the process's queue entry was kept for it, never
/// withdrawn and queued again), that entry was in Redis before the remote
/// waiter started, and the dropped one was gone before the holder let go
/// (so it never had the lock: a process that got its turn goes behind the
/// others, round robin). Otherwise the two race to queue, legitimately.
pub async fn drop_acquire_while_waiting(f: &Fixture) {
    let base = &baseline(f).await;
    let ordered = std::sync::atomic::AtomicUsize::new(0);
    let ordered = &ordered;
    every_poll("acquire, waiting", |k| async move {
        let key = format!("wait-{k}");
        let lease = f.peer.acquire(key.as_str(), owner("holder")).await.unwrap();
        // The holder lets go once both waiters are on their way (or at
        // the latest after a second): on a loaded machine a fixed hold
        // could end before they queue, and the order would never be known.
        let letting_go = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let both_started = Arc::new(tokio::sync::Notify::new());
        let release = release_later(Duration::ZERO, {
            let (letting_go, both_started) = (Arc::clone(&letting_go), Arc::clone(&both_started));
            async move {
                let _ = timeout(Duration::from_secs(1), both_started.notified()).await;
                sleep(Duration::from_millis(10)).await;
                letting_go.store(true, std::sync::atomic::Ordering::SeqCst);
                lease.release().await.unwrap();
            }
        });
        let acquire = f
            .module
            .acquire(key.as_str(), owner("victim").timeout(WAIT));
        let before = (f.residue.local)();
        let victim_gone = std::sync::atomic::AtomicBool::new(false);
        let victim = async {
            let done = poll_then_drop(acquire, k).await;
            let never_held = !letting_go.load(std::sync::atomic::Ordering::SeqCst);
            victim_gone.store(true, std::sync::atomic::Ordering::SeqCst);
            (done, never_held)
        };
        let ((done, never_held), (local, remote, in_order)) = tokio::join!(victim, async {
            queued(f, before).await;
            let (local, joined) = joining_waiter(&f.module, &key, "local");
            let _ = joined.await;
            let kept = !victim_gone.load(std::sync::atomic::Ordering::SeqCst);
            let first = kept && queue_appears(f, &key, &release).await;
            let remote = waiter(&f.peer, &key, "remote");
            both_started.notify_one();
            (local, remote, first)
        });
        let completed = done.is_some();
        if let Some(lease) = done {
            assert!(lease.unwrap().release().await.unwrap());
        }
        release.await.unwrap();
        let (local, remote) = (local.await.unwrap(), remote.await.unwrap());
        if f.fifo && in_order && never_held {
            ordered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert!(
                local <= remote,
                "dropped at {k}: the later waiter was served first"
            );
        }
        becomes_free(
            &f.peer,
            &key,
            SETTLE,
            &format!("waiting acquire dropped at {k}"),
        )
        .await;
        settled(f, base, &format!("waiting acquire dropped at {k}")).await;
        completed
    })
    .await;
    if f.fifo {
        let ordered = ordered.load(std::sync::atomic::Ordering::SeqCst);
        eprintln!("acquire, waiting: the order checked after {ordered} of the drops");
        assert!(
            ordered > 0,
            "the order was never known: the check is vacuous"
        );
    }
}

/// A waiter like [`waiter`] that also says when it joined (its acquire's
/// first poll is over: it is in the local queue).
fn joining_waiter(
    m: &LockingModule,
    key: &str,
    who: &str,
) -> (JoinHandle<Instant>, tokio::sync::oneshot::Receiver<()>) {
    let (m, key, who) = (m.clone(), key.to_owned(), who.to_owned());
    let (joined, joined_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut acquire = std::pin::pin!(m.acquire(key.as_str(), owner(&who).timeout(WAIT)));
        let mut joined = Some(joined);
        let lease = std::future::poll_fn(|cx| {
            let polled = acquire.as_mut().poll(cx);
            if let Some(j) = joined.take() {
                let _ = j.send(());
            }
            polled
        })
        .await
        .unwrap_or_else(|e| panic!("waiter {who} on {key}: {e}"));
        let at = Instant::now();
        lease.release().await.expect("the waiter's release");
        at
    });
    (task, joined_rx)
}

/// Waits until the wait queue of `key` is in the backend (a process is
/// queued for it), while the holder has not let go (`release` still
/// running). Whether it appeared; false at once where the order is not
/// promised (no such queues to wait for).
async fn queue_appears(f: &Fixture, key: &str, release: &JoinHandle<()>) -> bool {
    if !f.fifo {
        return false;
    }
    let queue = format!("{{{key}}}:q");
    let end = Instant::now() + WAIT;
    while Instant::now() < end && !release.is_finished() {
        if (f.residue.stored)()
            .await
            .iter()
            .any(|k| k.ends_with(&queue))
        {
            return !release.is_finished();
        }
        sleep(Duration::from_millis(1)).await;
    }
    false
}

/// `release` dropped at every poll while two waiters (local and remote)
/// wait: whether or not it went out, it can be repeated, and the waiters
/// get the lock before their deadlines.
pub async fn drop_release_with_waiters(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("release", |k| async move {
        let key = format!("release-{k}");
        f.module
            .acquire(key.as_str(), owner("holder"))
            .await
            .unwrap();
        let before = (f.residue.local)();
        let local = waiter(&f.module, &key, "local");
        queued(f, before).await;
        let remote = waiter(&f.peer, &key, "remote");
        queued(f, before).await;
        let release = f.module.release(key.as_str(), by("holder"));
        let completed = poll_then_drop(release, k).await.is_some();
        // Repeatable: if the dropped one never went out, this one does.
        let _ = f.module.release(key.as_str(), by("holder")).await.unwrap();
        local.await.unwrap();
        remote.await.unwrap();
        becomes_free(&f.peer, &key, SETTLE, &format!("release dropped at {k}")).await;
        settled(f, base, &format!("release dropped at {k}")).await;
        completed
    })
    .await;
}

/// `force_release` of a lock with waiters dropped at every poll: the lock
/// is freed (by it, or by its holder after it) and the waiters get it.
pub async fn drop_force_release_with_waiters(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("force_release", |k| async move {
        let key = format!("force-{k}");
        f.module
            .acquire(key.as_str(), owner("stuck").expire(Duration::from_secs(30)))
            .await
            .unwrap();
        let before = (f.residue.local)();
        let local = waiter(&f.module, &key, "local");
        queued(f, before).await;
        let remote = waiter(&f.peer, &key, "remote");
        queued(f, before).await;
        let force = f.module.force_release(key.as_str(), InspectOptions::new());
        let completed = poll_then_drop(force, k).await.is_some();
        // If the dropped one never freed the lock, its holder's release
        // does (a second force-release could free a waiter's turn instead).
        let _ = f.module.release(key.as_str(), by("stuck")).await.unwrap();
        local.await.unwrap();
        remote.await.unwrap();
        becomes_free(
            &f.peer,
            &key,
            SETTLE,
            &format!("force_release dropped at {k}"),
        )
        .await;
        settled(f, base, &format!("force_release dropped at {k}")).await;
        completed
    })
    .await;
}

/// `inspect` and `locks` dropped at every poll: they change nothing.
pub async fn drop_inspect_and_locks(f: &Fixture) {
    let base = &baseline(f).await;
    let lease = f.module.acquire("seen", owner("holder")).await.unwrap();
    every_poll("inspect", |k| async move {
        let inspect = f.module.inspect(["seen", "unseen"], InspectOptions::new());
        poll_then_drop(inspect, k).await.is_some()
    })
    .await;
    every_poll("locks", |k| async move {
        poll_then_drop(f.module.locks(ListOptions::new()), k)
            .await
            .is_some()
    })
    .await;
    assert!(!is_free(&f.peer, "seen").await, "inspection freed a lock");
    assert!(lease.release().await.unwrap());
    settled(f, base, "inspect dropped").await;
}

/// `extend` dropped at every poll: the lock is still the owner's, with the
/// old lease or the new, and is released normally.
pub async fn drop_extend(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("extend", |k| async move {
        let key = format!("extend-{k}");
        let lease = f
            .module
            .acquire(key.as_str(), owner("holder").expire(Duration::from_secs(5)))
            .await
            .unwrap();
        let extend = f.module.extend(
            key.as_str(),
            ExtendOptions::new(Duration::from_secs(10)).owner_id("holder"),
        );
        let completed = poll_then_drop(extend, k).await.is_some();
        assert!(
            !is_free(&f.peer, &key).await,
            "dropped at {k}: the lock was lost"
        );
        assert!(lease.release().await.unwrap());
        becomes_free(&f.peer, &key, SETTLE, &format!("extend dropped at {k}")).await;
        settled(f, base, &format!("extend dropped at {k}")).await;
        completed
    })
    .await;
}

/// `release_all` of an owner dropped at every poll: repeated, it frees
/// what the dropped one did not.
pub async fn drop_release_all(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("release_all", |k| async move {
        let keys: Vec<String> = (0..3).map(|i| format!("all-{k}-{i}")).collect();
        let who = format!("bulk-{k}");
        f.module.acquire(keys.clone(), owner(&who)).await.unwrap();
        let completed = poll_then_drop(f.module.release_all(by(&who)), k)
            .await
            .is_some();
        f.module.release_all(by(&who)).await.unwrap();
        for key in &keys {
            becomes_free(&f.peer, key, SETTLE, &format!("release_all dropped at {k}")).await;
        }
        settled(f, base, &format!("release_all dropped at {k}")).await;
        completed
    })
    .await;
}

/// `execute` dropped at every poll (while acquiring, while its job runs,
/// while releasing): the locks are free soon after, not at the end of
/// the 60 s lease.
pub async fn drop_execute(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("execute", |k| async move {
        let key = format!("execute-{k}");
        let execute = f
            .module
            .execute(key.as_str(), ExecuteOptions::new(), |held| async move {
                sleep(Duration::from_millis(5)).await;
                held.fencing_token()
            });
        let completed = poll_then_drop(execute, k).await.is_some();
        becomes_free(&f.peer, &key, SETTLE, &format!("execute dropped at {k}")).await;
        settled(f, base, &format!("execute dropped at {k}")).await;
        completed
    })
    .await;
}

/// `Lease::extend` then `Lease::release`, each dropped at every poll: a
/// dropped extend leaves the lease usable, a dropped release can be
/// repeated by the owner.
pub async fn drop_lease_release_and_extend(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("Lease::extend", |k| async move {
        let key = format!("lease-extend-{k}");
        let mut lease = f
            .module
            .acquire(key.as_str(), owner("holder").expire(Duration::from_secs(5)))
            .await
            .unwrap();
        let completed = poll_then_drop(lease.extend(Duration::from_secs(10)), k)
            .await
            .is_some();
        assert!(
            lease.release().await.unwrap(),
            "dropped at {k}: the lease was lost"
        );
        settled(f, base, &format!("Lease::extend dropped at {k}")).await;
        completed
    })
    .await;
    every_poll("Lease::release", |k| async move {
        let key = format!("lease-release-{k}");
        let lease = f
            .module
            .acquire(key.as_str(), owner("holder"))
            .await
            .unwrap();
        let completed = poll_then_drop(lease.release(), k).await.is_some();
        let _ = f.module.release(key.as_str(), by("holder")).await.unwrap();
        becomes_free(
            &f.peer,
            &key,
            SETTLE,
            &format!("Lease::release dropped at {k}"),
        )
        .await;
        settled(f, base, &format!("Lease::release dropped at {k}")).await;
        completed
    })
    .await;
}

/// `LeaseGuard::release` dropped at every poll, and the guard dropped
/// unreleased: the lock is released in the background either way.
pub async fn drop_guard_release(f: &Fixture) {
    let base = &baseline(f).await;
    every_poll("LeaseGuard::release", |k| async move {
        let key = format!("guard-{k}");
        let guard = f
            .module
            .acquire(key.as_str(), owner("holder"))
            .await
            .unwrap()
            .guard();
        assert!(guard.fencing_token() > 0);
        let completed = poll_then_drop(guard.release(), k).await.is_some();
        becomes_free(
            &f.peer,
            &key,
            SETTLE,
            &format!("guard release dropped at {k}"),
        )
        .await;
        settled(f, base, &format!("guard release dropped at {k}")).await;
        completed
    })
    .await;
}

/// A whole workflow run (an acquire step that waits for a holder, a step,
/// the release step) dropped at every poll: the lock steps' locks are
/// released, by the release step or in the background.
pub async fn drop_workflow_run(f: &Fixture) {
    let base = &baseline(f).await;
    let work = create_step("work", |_ctx, ()| async move {
        sleep(Duration::from_millis(2)).await;
        Ok::<_, StepError>(())
    });
    let workflow = create_workflow("locked", move |run, key: String| {
        let work = work.clone();
        async move {
            run.step(
                &acquire_lock_step(),
                AcquireLockInput::new(key.as_str()).timeout(WAIT),
            )
            .await?;
            run.step(&work, ()).await?;
            run.step(&release_lock_step(), ReleaseLockInput::new(key.as_str()))
                .await?;
            Ok(())
        }
    });
    let container = Container::with_locking(f.module.clone());
    let (workflow, container) = (Arc::new(workflow), Arc::new(container));
    every_poll("workflow run", |k| {
        let (workflow, container) = (Arc::clone(&workflow), Arc::clone(&container));
        async move {
            let key = format!("workflow-{k}");
            let lease = f.peer.acquire(key.as_str(), owner("holder")).await.unwrap();
            let release = release_later(Duration::from_millis(20), async move {
                lease.release().await.unwrap();
            });
            let run = workflow.run(&container, key.clone());
            let completed = poll_then_drop(run, k).await.is_some();
            release.await.unwrap();
            becomes_free(&f.peer, &key, SETTLE, &format!("workflow dropped at {k}")).await;
            settled(f, base, &format!("workflow dropped at {k}")).await;
            completed
        }
    })
    .await;
}
