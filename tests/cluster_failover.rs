//! Redis Cluster failover (feature `cluster`): three masters with a replica
//! each; a master is killed while its slot holds a lock, and its replica
//! takes over (`cluster-node-timeout` 1 s). In a binary of its own: it
//! kills servers, and takes a few seconds.

mod support;

use std::time::Duration;

use lockstep::{AcquireOptions, BackendErrorKind, LockError, RedisConfig, RedisProvider};
use support::cluster::{Cluster, is_master};
use tokio::time::Instant;

async fn provider(cluster: &Cluster, namespace: &str, acked: bool) -> RedisProvider {
    let mut config = RedisConfig::from_cluster(cluster.urls())
        .namespace(namespace)
        .connect_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1));
    if acked {
        // Each acquisition waits until its master's replica has it, so
        // that a failover cannot lose a lock already reported as held.
        config = config.wait_for_replicas(1, Duration::from_millis(500));
    }
    RedisProvider::connect(config)
        .await
        .expect("connect to the cluster")
}

/// A lock acknowledged by its master's replica is still held after the
/// master is killed and the replica promoted; a call made while no master
/// serves the slot waits (within its deadline) and succeeds after the
/// promotion; acquisitions that require a replica fail, typed, until the
/// promoted master has a replica again; tokens keep growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_lock_survives_its_master_s_failover_and_calls_resume() {
    let cluster = Cluster::start_with(3, 1);
    let ns = "fo:";
    let acked = support::module_with(provider(&cluster, ns, true).await);
    let plain = support::module_with(provider(&cluster, ns, false).await);
    let opts = |o: &str| {
        AcquireOptions::new()
            .owner_id(o)
            .expire(Duration::from_secs(60))
    };
    let lease = acked.acquire("order_1", opts("a")).await.unwrap();
    let first_token = lease.fencing_token();
    let at = cluster.master_index_of(&format!("{ns}{{order_1}}"));
    // Other keys of the same master.
    let mut same_master = (0..)
        .map(|i| format!("order_{i}"))
        .filter(|k| k != "order_1" && cluster.master_index_of(&format!("{ns}{{{k}}}")) == at);
    let (during_key, acked_key) = (same_master.next().unwrap(), same_master.next().unwrap());

    cluster.masters[at].signal("KILL");
    let killed = Instant::now();
    // Made while the slot has no master: it waits, and gets the lock once
    // the replica is promoted.
    let during = tokio::spawn({
        let plain = plain.clone();
        async move {
            plain
                .acquire(
                    during_key.as_str(),
                    opts("b").timeout(Duration::from_secs(20)),
                )
                .await
        }
    });
    support::eventually(
        Duration::from_secs(20),
        "the replica to be promoted",
        || async { is_master(&cluster.replicas_of(at)[0]) },
    )
    .await;
    let promoted_after = killed.elapsed();
    let lease_b = during
        .await
        .unwrap()
        .expect("the call made during the outage succeeds after the promotion");
    let resumed_after = killed.elapsed();
    eprintln!(
        "promoted after {promoted_after:?}; the waiting call got its lock after {resumed_after:?}"
    );

    // The lock taken before the failover is still held, by its owner only.
    let err = plain
        .acquire("order_1", opts("b").timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, LockError::Contended { .. }), "{err}");

    // The promoted master has no replica: acknowledged acquisitions fail,
    // and leave nothing behind.
    let err = acked
        .acquire(acked_key.as_str(), opts("c").timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LockError::Backend(b) if b.kind() == BackendErrorKind::NotReplicated),
        "{err:?}"
    );
    let free = plain
        .acquire(acked_key.as_str(), opts("d").timeout(Duration::ZERO))
        .await
        .expect("the unacknowledged acquisition was released");
    assert!(free.release().await.unwrap());

    // A new replica joins the promoted master.
    let _replica = cluster.add_replica(&cluster.replicas_of(at)[0]);
    let again = acked
        .acquire(
            acked_key.as_str(),
            opts("c").timeout(Duration::from_secs(5)),
        )
        .await
        .expect("acknowledged again once a replica is back");
    assert!(again.release().await.unwrap());

    assert!(lease.release().await.unwrap());
    let next = plain.acquire("order_1", opts("b")).await.unwrap();
    assert!(next.fencing_token() > first_token);
    assert!(next.release().await.unwrap());
    assert!(lease_b.release().await.unwrap());
}
