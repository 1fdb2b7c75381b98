//! Liveness and leak reproducers, one per finding of the cancel-safety
//! review (`review-findings.md`): each failed before its fix.

mod support;

use std::time::Duration;

use futures_util::FutureExt;
use lockstep::{AcquireOptions, ExecuteOptions, ExtendOptions, InMemoryProvider, LockingModule};
use tokio::time::{Instant, timeout};

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
    let (m, _) = in_memory();
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
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    let (m, _) = in_memory();
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
    tokio::time::sleep(Duration::from_millis(20)).await;
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
    assert_eq!(provider.waiting_keys(), 0, "entries left by dropped waiters");
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
