//! Inspection and force-release, on every provider (`i_` cases): who holds
//! a lock, since when, with which token and lease, and how many wait; and
//! an operator freeing a lock whose holder then finds out.

use std::time::{Duration, SystemTime};

use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, InspectOptions, InvalidInput, ListOptions,
    LockError, LockState, LockingModule,
};
use tokio::time::{Instant, sleep, timeout};

use super::Fixture;

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

fn any() -> InspectOptions {
    InspectOptions::new()
}

/// Waits until `cond` holds (polled every 10 ms), at most 10 s.
async fn until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "never: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Whether waiters show in `waiting`: processes queued in Redis (not when
/// waiters poll: Redlock, or a provider configured to poll), calls in
/// memory.
fn counts_waiters(f: &Fixture) -> bool {
    f.fifo || f.provider.identifier() == "in-memory"
}

/// Whether an inspected token is the one the holder got. A Redlock set
/// reports the highest of its agreeing masters' tokens, and its holder got
/// the highest of those that answered first: at most that.
fn is_holders_token(f: &Fixture, inspected: u64, returned: u64) -> bool {
    if f.provider.identifier() == "locking-redlock" {
        inspected >= returned
    } else {
        inspected == returned
    }
}

/// An acquisition shows its owner, token, lease, time and metadata; a free
/// key shows free; an anonymous lock no owner; a lock without expiry no
/// lease; a waiter shows in the count.
pub async fn i_inspect_reports_holder_token_lease_time_and_waiters(f: &Fixture) {
    let m = &f.module;
    let before = SystemTime::now();
    let lease = m
        .acquire(
            "k",
            owner("o1")
                .expire(Duration::from_secs(10))
                .metadata("job=nightly"),
        )
        .await
        .unwrap();
    let infos = m.inspect(["k", "free"], any()).await.unwrap();
    assert_eq!(infos.len(), 2);
    assert_eq!(
        (infos[0].key.as_str(), infos[1].key.as_str()),
        ("k", "free")
    );
    assert_eq!(infos[1].state, LockState::Free);
    let h = infos[0].holder().expect("k is held");
    assert_eq!(h.owner.as_deref(), Some("o1"));
    assert!(is_holders_token(f, h.fencing_token, lease.fencing_token()));
    assert_eq!(h.metadata.as_deref(), Some("job=nightly"));
    let left = h.lease_left.expect("a lease");
    assert!(
        left > Duration::from_secs(5) && left <= Duration::from_secs(10),
        "{left:?}"
    );
    assert!(h.held_for < Duration::from_secs(5), "{:?}", h.held_for);
    // The backend's clock is this machine's here: within a second.
    let after = SystemTime::now();
    assert!(
        h.acquired_at + Duration::from_secs(1) >= before
            && h.acquired_at <= after + Duration::from_secs(1),
        "{:?} not within {before:?}..{after:?}",
        h.acquired_at
    );

    // A waiter shows, and once it has the lock it is the holder, with a
    // newer token.
    let peer = f.peer.clone();
    let waiter = tokio::spawn(async move {
        peer.acquire("k", owner("o2").timeout(Duration::from_secs(20)))
            .await
    });
    if counts_waiters(f) {
        until("the waiter is counted", async || {
            m.inspect("k", any()).await.unwrap()[0].waiting >= 1
        })
        .await;
    }
    let first_token = lease.fencing_token();
    assert!(lease.release().await.unwrap());
    let second = waiter.await.unwrap().expect("the waiter gets the lock");
    let info = &m.inspect("k", any()).await.unwrap()[0];
    let h = info.holder().expect("held by the waiter");
    assert_eq!(h.owner.as_deref(), Some("o2"));
    assert!(is_holders_token(f, h.fencing_token, second.fencing_token()));
    assert!(h.fencing_token > first_token);
    assert_eq!(h.lease_left, None, "no expire: no lease");
    assert_eq!(h.metadata, None);
    assert_eq!(info.waiting, 0);
    assert!(second.release().await.unwrap());

    let anon = m.acquire("anon", AcquireOptions::new()).await.unwrap();
    let h = m.inspect("anon", any()).await.unwrap()[0]
        .holder()
        .cloned()
        .unwrap();
    assert_eq!(h.owner, None);
    assert!(anon.release().await.unwrap());
    assert_eq!(
        m.inspect("anon", any()).await.unwrap()[0].state,
        LockState::Free
    );
}

/// A re-entry shows the holder's newest token, and the first acquisition's
/// time.
pub async fn i_reentry_shows_the_newest_token(f: &Fixture) {
    let m = &f.module;
    let first = m.acquire("k", owner("o1")).await.unwrap();
    let at = m.inspect("k", any()).await.unwrap()[0]
        .holder()
        .unwrap()
        .acquired_at;
    let again = m
        .acquire("k", owner("o1").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(again.fencing_token() > first.fencing_token());
    let h = m.inspect("k", any()).await.unwrap()[0]
        .holder()
        .cloned()
        .unwrap();
    assert!(is_holders_token(f, h.fencing_token, again.fencing_token()));
    assert_eq!(h.acquired_at, at);
    assert!(h.lease_left.is_some(), "the re-entry gave it a lease");
    assert!(again.release().await.unwrap());
}

/// `locks` lists held locks oldest first, by key prefix and by owner.
pub async fn i_locks_lists_held_locks_oldest_first(f: &Fixture) {
    let m = &f.module;
    // The oldest has the last name, so that the order by age is not the
    // order by key (which breaks ties).
    let z = m.acquire("jobs/z", owner("o1")).await.unwrap();
    let taken = m.inspect("jobs/z", any()).await.unwrap()[0]
        .holder()
        .unwrap()
        .acquired_at;
    // Acquisition times are in milliseconds (this host's clock, which the
    // backends here share): the next one must fall in a later one.
    until(
        "the clock passes the first acquisition's millisecond",
        async || SystemTime::now() > taken + Duration::from_millis(2),
    )
    .await;
    let a = m
        .acquire("jobs/a", owner("o2").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    let c = m.acquire("other/c", owner("o1")).await.unwrap();
    let released = m.acquire("jobs/gone", owner("o3")).await.unwrap();
    assert!(released.release().await.unwrap());

    let keys = |l: Vec<lockstep::LockInfo>| l.into_iter().map(|i| i.key).collect::<Vec<_>>();
    let jobs = m.locks(ListOptions::new().prefix("jobs/")).await.unwrap();
    assert_eq!(keys(jobs), ["jobs/z", "jobs/a"]);
    let o1 = m.locks(ListOptions::new().owner_id("o1")).await.unwrap();
    assert_eq!(keys(o1), ["jobs/z", "other/c"]);
    let all = m.locks(ListOptions::new()).await.unwrap();
    assert_eq!(keys(all), ["jobs/z", "jobs/a", "other/c"]);
    for l in [z, a, c] {
        assert!(l.release().await.unwrap());
    }
    assert!(m.locks(ListOptions::new()).await.unwrap().is_empty());
}

/// force_release frees a lock whoever holds it: the old holder's extend
/// fails, the next holder's token is higher, a free key reports `None`;
/// an `execute` job's loss signal fires.
pub async fn i_force_release_frees_fences_and_tells_the_old_holder(f: &Fixture) {
    let m = &f.module;
    let old = m
        .acquire("k", owner("o1").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    let freed = f.peer.force_release(["k", "free"], any()).await.unwrap();
    let h = freed[0]
        .as_ref()
        .and_then(|i| i.holder())
        .expect("k was held");
    assert_eq!(h.owner.as_deref(), Some("o1"));
    assert!(is_holders_token(f, h.fencing_token, old.fencing_token()));
    assert!(freed[1].is_none(), "a free key is reported free");
    let e = m
        .extend(
            "k",
            ExtendOptions::new(Duration::from_secs(30)).owner_id("o1"),
        )
        .await
        .unwrap_err();
    assert!(e.is_lost(), "{e:?}");
    let next = f.peer.acquire("k", owner("o2")).await.unwrap();
    assert!(next.fencing_token() > old.fencing_token());
    assert!(
        !old.release().await.unwrap(),
        "the old holder holds nothing"
    );
    assert!(next.release().await.unwrap());

    let peer = f.peer.clone();
    let r = m
        .execute(
            "job",
            ExecuteOptions::new().expire(Duration::from_millis(300)),
            |held| async move {
                peer.force_release("job", InspectOptions::new())
                    .await
                    .unwrap();
                timeout(Duration::from_secs(5), held.cancelled())
                    .await
                    .expect("the loss signal fires after a force-release");
            },
        )
        .await;
    assert!(matches!(r, Err(LockError::LeaseLost { .. })), "{r:?}");
}

/// Metadata is bounded and printable; a module that records holders
/// writes the host and pid first.
pub async fn i_metadata_is_checked_and_recorded(f: &Fixture) {
    let m = &f.module;
    let long = "x".repeat(lockstep::MAX_METADATA_LEN + 1);
    let e = m
        .acquire("k", owner("o1").metadata(long))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            LockError::InvalidInput(InvalidInput::MetadataTooLong { .. })
        ),
        "{e:?}"
    );
    let e = m
        .acquire("k", owner("o1").metadata("a\nb"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, LockError::InvalidInput(InvalidInput::ControlInMetadata)),
        "{e:?}"
    );
    assert_eq!(
        m.inspect("k", any()).await.unwrap()[0].state,
        LockState::Free
    );

    let recording = LockingModule::builder()
        .provider_arc("p", f.provider.clone(), true)
        .record_holder(true)
        .build()
        .unwrap();
    let lease = recording
        .acquire("k", owner("o1").metadata("label=deploy"))
        .await
        .unwrap();
    let info = &m.inspect("k", any()).await.unwrap()[0];
    let meta = info.holder().and_then(|h| h.metadata.clone()).unwrap();
    assert!(
        meta.starts_with("host=")
            && meta.ends_with(&format!("pid={} label=deploy", std::process::id())),
        "{meta}"
    );
    assert!(lease.release().await.unwrap());
}
