//! PostgreSQL-specific behaviour of the provider, beyond the contract
//! suite (`tests/postgres_contract.rs`).

use std::time::Duration;

use lockstep::provider::LockingProvider;
use lockstep::{AcquireOptions, ConfigError, LockingModule, PostgresConfig, PostgresProvider};
use lockstep_testkit::{
    OwnSchema, PostgresServer, drop_everywhere, eventually, shared_postgres_url,
};
use tokio::time::Instant;

/// A schema of the test's own on the (maybe shared) server, dropped after.
fn unique_schema(url: &str) -> OwnSchema {
    OwnSchema::new(url, "lockstep_pgtest")
}

async fn provider(url: &str, schema: &str) -> PostgresProvider {
    PostgresProvider::connect(PostgresConfig::from_url(url).schema(schema))
        .await
        .expect("connect to the test PostgreSQL")
}

fn module(p: PostgresProvider) -> LockingModule {
    LockingModule::builder()
        .default_provider("locking-postgres", p)
        .build()
        .unwrap()
}

/// Two providers (two processes' views) taking the same keys in opposite
/// orders, many rounds: never "deadlock detected", never a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_key_orders_never_deadlock() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let schema = own.name().to_owned();
    let a = module(provider(&url, &schema).await);
    let b = module(provider(&url, &schema).await);
    let keys = ["x", "y", "z", "w"];
    let mut reversed = keys;
    reversed.reverse();
    let run = |m: LockingModule, keys: [&'static str; 4], who: &'static str| {
        tokio::spawn(async move {
            for round in 0..150 {
                let lease = m
                    .acquire(
                        keys.to_vec(),
                        AcquireOptions::new()
                            .owner_id(format!("{who}-{round}"))
                            .expire(Duration::from_secs(10))
                            .timeout(Duration::from_secs(10)),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{who} round {round}: {e}"));
                assert!(lease.release().await.expect("release"));
            }
        })
    };
    let (ra, rb) = tokio::join!(run(a, keys, "a"), run(b, reversed, "b"));
    ra.unwrap();
    rb.unwrap();
}

/// Fencing tokens come from a sequence: they keep growing across a server
/// crash and restart, and the provider's pool recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_grow_across_a_server_restart() {
    let mut server = PostgresServer::start();
    let url = server.url();
    let m = module(provider(&url, "lockstep").await);
    let mut last = 0;
    for _ in 0..8 {
        let lease = m.acquire("k", AcquireOptions::new()).await.unwrap();
        assert!(lease.fencing_token() > last);
        last = lease.fencing_token();
        assert!(lease.release().await.unwrap());
    }
    server.kill();
    server.restart();
    // The pooled connections died with the server: retried until fresh
    // ones come.
    let end = Instant::now() + Duration::from_secs(20);
    let lease = loop {
        match m.acquire("k", AcquireOptions::new()).await {
            Ok(l) => break l,
            Err(e) if e.is_backend() && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("after the restart: {e} ({e:?})"),
        }
    };
    assert!(
        lease.fencing_token() > last,
        "token {} after the restart, {last} before",
        lease.fencing_token()
    );
    assert!(lease.release().await.unwrap());
}

/// The DDL is idempotent: connecting again (and several providers at once)
/// on an existing schema works, and they share the locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ddl_is_idempotent() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let schema = own.name().to_owned();
    let first = module(provider(&url, &schema).await);
    let lease = first
        .acquire("k", AcquireOptions::new().owner_id("o"))
        .await
        .unwrap();
    let again: Vec<_> = (0..4)
        .map(|_| {
            let (url, schema) = (url.clone(), schema.clone());
            tokio::spawn(async move { provider(&url, &schema).await })
        })
        .collect();
    for p in again {
        let m = module(p.await.unwrap());
        let e = m
            .acquire("k", AcquireOptions::new().owner_id("other"))
            .await
            .unwrap_err();
        assert!(e.is_contended(), "{e}");
    }
    assert!(lease.release().await.unwrap());
}

/// A schema name that is not `[a-z_][a-z0-9_]*` of at most 63 bytes is a
/// typed error, before anything is sent.
#[tokio::test]
async fn a_bad_schema_name_is_a_typed_error() {
    for bad in [
        "Locks",
        "a-b",
        "x\"; DROP TABLE y; --",
        "",
        "9a",
        &"a".repeat(64),
    ] {
        let e = PostgresProvider::connect(
            PostgresConfig::from_url("postgres://127.0.0.1:1/db").schema(bad),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, ConfigError::InvalidSetting { name: "schema", .. }),
            "{bad:?}: {e}"
        );
    }
}

/// A bad URL is `InvalidUrl`; a server that does not answer is
/// `Unreachable`, within the connect timeout.
#[tokio::test]
async fn bad_urls_and_unreachable_servers_are_config_errors() {
    let e = PostgresProvider::connect(PostgresConfig::from_url("postgres://h:notaport/db"))
        .await
        .unwrap_err();
    assert!(matches!(e, ConfigError::InvalidUrl { .. }), "{e}");
    assert!(e.to_string().starts_with("invalid PostgreSQL URL"), "{e}");
    let start = Instant::now();
    let e = PostgresProvider::connect(
        PostgresConfig::from_url("postgres://u:secret@127.0.0.1:1/db")
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ConfigError::Unreachable { .. }), "{e}");
    assert!(!e.to_string().contains("secret"), "{e}");
    assert!(
        e.to_string().starts_with("cannot reach PostgreSQL at"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// Waiters in three providers (three processes' views) are served in the
/// order they queued, and a provider with two waiters serves them in
/// arrival order, behind the others that queued before its second
/// (round robin): A1, B, C, then A2 (A's entry went to the back when A1
/// had its turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_queue_order_across_providers() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let schema = own.name().to_owned();
    let holder = module(provider(&url, &schema).await);
    let a = module(provider(&url, &schema).await);
    let b = module(provider(&url, &schema).await);
    let c = module(provider(&url, &schema).await);
    let lease = holder
        .acquire("fifo", AcquireOptions::new().owner_id("holder"))
        .await
        .unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let wait = |m: &LockingModule, who: &'static str| {
        let (m, order) = (m.clone(), std::sync::Arc::clone(&order));
        tokio::spawn(async move {
            let lease = m
                .acquire(
                    "fifo",
                    AcquireOptions::new()
                        .owner_id(who)
                        .timeout(Duration::from_secs(20)),
                )
                .await
                .unwrap_or_else(|e| panic!("{who}: {e}"));
            order.lock().unwrap().push(who);
            // Held briefly, so that the next one really waits for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(lease.release().await.unwrap());
        })
    };
    // Each waiter starts once the one before it is queued: the holder's
    // view counts the providers queued for the key (and its own waiters).
    let queued = |n: u64| {
        let holder = holder.clone();
        async move {
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let info = holder.inspect("fifo", Default::default()).await.unwrap();
                if info[0].waiting >= n {
                    return;
                }
                assert!(Instant::now() < end, "never {n} queued");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let mut tasks = vec![wait(&a, "a1")];
    queued(1).await;
    // A's second waiter lines up behind its first, in A's memory.
    let a_local = a.clone();
    tasks.push(wait(&a, "a2"));
    let end = Instant::now() + Duration::from_secs(10);
    while a_local.inspect("fifo", Default::default()).await.unwrap()[0].waiting < 2 {
        assert!(Instant::now() < end, "a2 never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tasks.push(wait(&b, "b"));
    queued(2).await;
    tasks.push(wait(&c, "c"));
    queued(3).await;
    assert!(lease.release().await.unwrap());
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["a1", "b", "c", "a2"]);
}

/// Expired locks and lapsed queue entries of keys nobody takes again are
/// swept (the provider does it once a minute; `sweep` on demand), live
/// ones stay, and a swept key's next token is still higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeping_deletes_only_what_has_expired() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let p = provider(&url, own.name()).await;
    let m = module(p.clone());
    let mut last = 0;
    for i in 0..5 {
        let lease = m
            .acquire(
                format!("gone-{i}").as_str(),
                AcquireOptions::new().expire(Duration::from_millis(1)),
            )
            .await
            .unwrap();
        last = last.max(lease.fencing_token());
    }
    let live = m
        .acquire("live", AcquireOptions::new().owner_id("o"))
        .await
        .unwrap();
    // Wait until the 1 ms leases have run out by the server's clock.
    let end = Instant::now() + Duration::from_secs(10);
    while !m
        .inspect(["gone-0", "gone-4"].as_slice(), Default::default())
        .await
        .unwrap()
        .iter()
        .all(|i| i.holder().is_none())
    {
        assert!(Instant::now() < end, "the leases never ran out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(p.sweep().await.unwrap(), 5);
    assert_eq!(p.sweep().await.unwrap(), 0, "a second sweep finds nothing");
    let info = &m.inspect("live", Default::default()).await.unwrap()[0];
    assert_eq!(info.holder().unwrap().owner.as_deref(), Some("o"));
    let again = m.acquire("gone-0", AcquireOptions::new()).await.unwrap();
    assert!(again.fencing_token() > last);
    assert!(again.release().await.unwrap());
    assert!(live.release().await.unwrap());
}

/// Within one provider a release hands the lock straight to the next local
/// waiter (in the release's own statement): each gets it in arrival order,
/// as itself (owner, lease, metadata), with a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_lock_to_the_next_local_waiter_as_itself() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let m = module(provider(&url, own.name()).await);
    let first = m
        .acquire("h", AcquireOptions::new().owner_id("first"))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for who in ["w1", "w2"] {
        let (waiting, tx) = (m.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let lease = waiting
                .acquire(
                    "h",
                    AcquireOptions::new()
                        .owner_id(who)
                        .expire(Duration::from_secs(30))
                        .metadata(format!("job {who}"))
                        .timeout(Duration::from_secs(20)),
                )
                .await
                .unwrap_or_else(|e| panic!("{who}: {e}"));
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            tx.send((who, lease.fencing_token(), done_tx)).unwrap();
            let _ = done_rx.await;
            assert!(lease.release().await.unwrap());
        }));
        // w2 joins once w1 waits (the provider counts its own waiters).
        let end = Instant::now() + Duration::from_secs(10);
        let n = if who == "w1" { 1 } else { 2 };
        while m.inspect("h", Default::default()).await.unwrap()[0].waiting < n {
            assert!(Instant::now() < end, "{who} never waited");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut last = first.fencing_token();
    assert!(first.release().await.unwrap());
    for expected in ["w1", "w2"] {
        let (who, token, done) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the next waiter gets the lock")
            .unwrap();
        assert_eq!(who, expected);
        assert!(token > last, "{who}'s token {token} after {last}");
        last = token;
        let info = &m.inspect("h", Default::default()).await.unwrap()[0];
        let holder = info.holder().expect("held");
        assert_eq!(holder.owner.as_deref(), Some(who));
        assert_eq!(holder.fencing_token, token);
        assert_eq!(
            holder.metadata.as_deref(),
            Some(format!("job {who}").as_str())
        );
        let left = holder.lease_left.expect("a lease");
        assert!(
            left > Duration::from_secs(25),
            "{left:?} left of a 30 s lease"
        );
        done.send(()).unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// With asynchronous commits a crash can lose the last moments' commits,
/// the token sequence's advance with them: the tokens after the restart
/// are still higher than every token handed out before (the sequence is
/// floored at the server's clock once per server start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grow_across_a_crash_with_asynchronous_commits() {
    let mut server = PostgresServer::start();
    let url = server.url();
    let p = PostgresProvider::connect(
        PostgresConfig::from_url(&url)
            .schema("lockstep")
            .synchronous_commit(false),
    )
    .await
    .unwrap();
    let m = module(p);
    let mut last = 0;
    // More than the sequence logs ahead (32), and the kill at once after:
    // the WAL writer has not flushed the last of them.
    for i in 0..100 {
        let lease = m
            .acquire(format!("k{i}").as_str(), AcquireOptions::new())
            .await
            .unwrap();
        assert!(lease.fencing_token() > last);
        last = lease.fencing_token();
    }
    server.kill();
    server.restart();
    let end = Instant::now() + Duration::from_secs(20);
    let lease = loop {
        match m.acquire("after", AcquireOptions::new()).await {
            Ok(l) => break l,
            Err(e) if e.is_backend() && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("after the restart: {e}"),
        }
    };
    assert!(
        lease.fencing_token() > last,
        "token {} after the crash, {last} before",
        lease.fencing_token()
    );
}

/// The first acquisition's reply was lost (its caller undoes it by its
/// nonce) while a second call of the same owner re-entered the lock and was
/// told it holds it: the undo must leave the lock to the owner. Run on the
/// schema's functions directly, where the nonces are ours to choose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_of_the_first_acquisition_leaves_a_lock_re_entered_since() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let m = module(provider(&url, own.name()).await);
    let s = own.name();
    let take = |nonce: &str| {
        own.psql(&format!(
            "SELECT reentered FROM \"{s}\".acquire(ARRAY['k'], 'o', '{nonce}', 60000, NULL, \
             NULL, false, false, false, false, 5000)"
        ))
        .unwrap()
    };
    let free = |nonce: &str| {
        own.psql(&format!(
            "SELECT \"{s}\".release(ARRAY['k'], 'o', '{nonce}', 'test', 1000, \
             NULL, NULL, NULL, NULL, false)"
        ))
        .unwrap()
    };
    assert_eq!(take("n1"), "f");
    assert_eq!(take("n2"), "t", "re-entered");
    assert_eq!(free("n1"), "{0}", "the undo of n1 releases nothing");
    let info = &m.inspect("k", Default::default()).await.unwrap()[0];
    assert_eq!(info.holder().unwrap().owner.as_deref(), Some("o"));
    assert_eq!(free(""), "{1}", "the owner releases it");
    let info = &m.inspect("k", Default::default()).await.unwrap()[0];
    assert!(info.holder().is_none());
}

/// Waits (bounded) until `p`'s calls wait for `n` keys.
async fn until_waiting(p: &PostgresProvider, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while p.waiting_keys() != n {
        assert!(Instant::now() < end, "never {n} keys waited for");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A multi-key waiter does not send a statement while another call of its
/// provider holds one of its keys: it is woken by that release and then
/// takes its keys in one attempt (two statements in all: the release and
/// the attempt; the wake-and-retry before sent three, plus a withdrawal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_key_waiter_sends_nothing_while_a_local_call_holds_a_key() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let p = provider(&url, own.name()).await;
    let m = module(p.clone());
    let held = m
        .acquire("a", AcquireOptions::new().expire(Duration::from_secs(30)))
        .await
        .unwrap();
    let before = p.statements();
    let waiting = m.clone();
    let waiter = tokio::spawn(async move {
        waiting
            .acquire(
                vec!["a", "b"],
                AcquireOptions::new()
                    .expire(Duration::from_secs(30))
                    .timeout(Duration::from_secs(20)),
            )
            .await
    });
    until_waiting(&p, 2).await;
    // Shorter than the waiter's fallback (1 s), after which it would try.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.statements(), before, "the waiter sent an attempt");
    assert!(held.release().await.unwrap());
    let lease = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the keys once released")
        .unwrap()
        .unwrap();
    assert_eq!(p.statements(), before + 2, "a release and one attempt");
    assert!(lease.release().await.unwrap());
    until_waiting(&p, 0).await;
}

/// A named owner re-entering a key it holds here is not held back by its
/// own lock, and a lock of this provider whose lease ran out holds nobody
/// back (both well before the waiter's fallback would try anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_gate_lets_re_entry_and_expired_leases_through() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let m = module(provider(&url, own.name()).await);
    let mine = m
        .acquire("a", AcquireOptions::new().owner_id("o"))
        .await
        .unwrap();
    let both = m
        .acquire(
            vec!["a", "b"],
            AcquireOptions::new()
                .owner_id("o")
                .timeout(Duration::from_millis(400)),
        )
        .await
        .expect("the owner re-enters its own lock");
    assert!(both.was_reentered("a") && !both.was_reentered("b"));
    assert!(both.release().await.unwrap());
    drop(mine);

    let short = m
        .acquire(
            "c",
            AcquireOptions::new()
                .owner_id("short")
                .expire(Duration::from_millis(150)),
        )
        .await
        .unwrap();
    let next = m
        .acquire(
            vec!["c", "d"],
            AcquireOptions::new()
                .owner_id("next")
                .timeout(Duration::from_millis(700)),
        )
        .await
        .expect("an expired lease holds nobody back");
    assert!(next.fencing_token() > short.fencing_token());
    assert!(!short.release().await.unwrap(), "its lease ran out");
    assert!(next.release().await.unwrap());
}

/// The gate is advisory: a lock of this provider freed by someone else (an
/// operator's force-release, from another process) does not keep this
/// provider's multi-key waiter from it; it tries again within its fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_freed_elsewhere_does_not_hold_back_a_gated_waiter() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    let p = provider(&url, own.name()).await;
    let m = module(p.clone());
    let operator = module(provider(&url, own.name()).await);
    let stuck = m
        .acquire("a", AcquireOptions::new().owner_id("stuck"))
        .await
        .unwrap();
    let waiting = m.clone();
    let waiter = tokio::spawn(async move {
        waiting
            .acquire(
                vec!["a", "b"],
                AcquireOptions::new()
                    .owner_id("waiter")
                    .timeout(Duration::from_secs(20)),
            )
            .await
    });
    until_waiting(&p, 2).await;
    let freed = operator
        .force_release("a", Default::default())
        .await
        .unwrap();
    assert_eq!(freed[0].as_ref().map(|i| i.key.as_str()), Some("a"));
    let lease = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the keys")
        .unwrap()
        .unwrap();
    assert!(lease.fencing_token() > stuck.fencing_token());
    assert!(!stuck.release().await.unwrap());
    assert!(lease.release().await.unwrap());
}

/// `connect` dropped at every poll and at moments spread over its run: no
/// connection of a dropped provider stays open. Its LISTEN task and its sweeper, once spawned, hold the
/// pool; left running, they would keep their backends (and the sweeper
/// its statements) for the life of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connect_leaves_no_connection_behind() {
    let url = shared_postgres_url();
    let own = unique_schema(&url);
    // The backends of this test's providers, by a name of their own.
    let app = own.name().to_owned();
    let app_url = if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={app}")
    } else {
        format!("{url} application_name={app}")
    };
    let backends = || {
        own.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"
        ))
        .expect("count the test's backends")
    };
    let backends = &backends;
    let connect = || PostgresProvider::connect(PostgresConfig::from_url(&app_url).schema(&app));
    let no_backend_left = |after: String| async move {
        let what = format!("no backend left {after}");
        eventually(Duration::from_secs(5), &what, || {
            std::future::ready(backends() == "0")
        })
        .await;
    };
    drop_everywhere(
        "connect",
        connect,
        |provider| async move { LockingProvider::shutdown(&provider.expect("connect")).await },
        no_backend_left,
    )
    .await;
}
