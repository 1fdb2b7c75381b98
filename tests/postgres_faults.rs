//! Faults on a real PostgreSQL (issue 12, item 6): a server restarted
//! mid-run, backends killed with `pg_terminate_backend` (pooled ones and the
//! LISTEN connection), a paused holder losing its lease to a successor, and
//! statements that hit the statement timeout or a wait's deadline.
//!
//! Only the public API is used, plus raw SQL (through the re-exported
//! tokio-postgres) to inject the faults: terminating the provider's own
//! backends (found in `pg_stat_activity` by an `application_name` unique to
//! each test) and holding a key's transaction-level advisory lock from an
//! open transaction, so that the provider's statements on that key block
//! server-side. Every test works in a schema of its own, dropped at the end;
//! the restart test has a private server.
//!
//! Every wait is a condition polled until a deadline; every call that could
//! hang is bounded by one.
//!
//! The provider's LISTEN connection is told from its pooled ones by its
//! last statement in `pg_stat_activity` (`LISTEN ...`); both carry the
//! `application_name` of the URL (the provider sets `lockstep` only when
//! the URL has none).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::deadpool_postgres::tokio_postgres::{self, Client, NoTls};
use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, InspectOptions, ListOptions, LockError,
    LockState, LockingModule, PostgresConfig, PostgresProvider, ReleaseOptions,
};
use lockstep_testkit::{OwnSchema, PostgresServer, shared_postgres_url};
use tokio::time::{Instant, sleep, timeout};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A name no other test (of this or another run) uses: `<prefix>_<hex>`.
fn unique(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(N.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{prefix}_{:016x}", h.finish())
}

/// `url` with an `application_name`, so that the provider's backends can be
/// told apart from everyone else's in `pg_stat_activity`.
fn with_app_name(url: &str, app: &str) -> String {
    if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={app}")
    } else {
        format!("{url} application_name={app}")
    }
}

/// A plain connection of the test's own (not the provider's), without a
/// statement timeout.
async fn raw(url: &str) -> Client {
    let mut config: tokio_postgres::Config = url.parse().expect("a valid URL");
    config.application_name("lockstep_faults_raw");
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = timeout(Duration::from_secs(10), config.connect(NoTls))
        .await
        .expect("raw connection: no answer within 10 s")
        .expect("raw connection");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0")
        .await
        .expect("raw connection settings");
    client
}

/// Connects a provider, bounded by a deadline.
async fn connect(config: PostgresConfig) -> PostgresProvider {
    timeout(Duration::from_secs(30), PostgresProvider::connect(config))
        .await
        .expect("connect: no answer within 30 s")
        .expect("connect to the test PostgreSQL")
}

fn module(p: &PostgresProvider) -> LockingModule {
    LockingModule::builder()
        .default_provider("locking-postgres", p.clone())
        .build()
        .expect("a valid module")
}

/// Polls `cond` until it holds; panics with `what` at the deadline.
async fn until(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < end, "not within {within:?}: {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// `fut`, which must answer within `within` (a hang is a failure).
async fn bounded<T>(what: &str, within: Duration, fut: impl Future<Output = T>) -> T {
    match timeout(within, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {within:?} (hung)"),
    }
}

/// A backend of the provider: its pid, its last query and its state.
#[derive(Debug, Clone)]
struct Backend {
    pid: i32,
    query: String,
    state: String,
}

impl Backend {
    /// The LISTEN connection's backend: its last statement is the LISTEN.
    fn is_listen(&self) -> bool {
        self.query
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("LISTEN")
    }
}

/// The backends whose `application_name` is `app` (never the caller's own).
async fn backends(client: &Client, app: &str) -> Vec<Backend> {
    client
        .query(
            "SELECT pid, coalesce(query, ''), coalesce(state, '') FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&app],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| Backend {
            pid: r.get(0),
            query: r.get(1),
            state: r.get(2),
        })
        .collect()
}

/// Terminates the backends `pids` (all the provider's, found by
/// application name) and waits until they are gone.
async fn terminate(client: &Client, app: &str, pids: &[i32]) {
    for pid in pids {
        client
            .query("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .expect("pg_terminate_backend");
    }
    until(
        "the terminated backends are gone",
        Duration::from_secs(10),
        async || {
            let alive = backends(client, app).await;
            !alive.iter().any(|b| pids.contains(&b.pid))
        },
    )
    .await;
}

/// A raw connection inside an open transaction holding the advisory lock
/// that the provider's functions take first for `key` (`lock_keys` in
/// schema.sql: `pg_advisory_xact_lock(hashtext('<schema>'), hashtext(key))`):
/// every statement of the provider on that key blocks server-side until
/// the transaction ends. Each test checks that it did block.
async fn block_key(url: &str, schema: &str, key: &str) -> Client {
    let client = raw(url).await;
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .query(
            "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
            &[&schema, &key],
        )
        .await
        .expect("take the key's advisory lock");
    client
}

/// Ends the blocker's transaction: the blocked statements proceed.
async fn unblock(blocker: Client) {
    blocker.batch_execute("COMMIT").await.expect("COMMIT");
}

/// The state of each key.
async fn states(m: &LockingModule, keys: &[&str]) -> Vec<LockState> {
    bounded(
        "inspect",
        Duration::from_secs(15),
        m.inspect(keys.to_vec(), InspectOptions::new()),
    )
    .await
    .expect("inspect")
    .into_iter()
    .map(|i| i.state)
    .collect()
}

/// The owner and fencing token of a held key.
async fn holder(m: &LockingModule, key: &str) -> Option<(Option<String>, u64)> {
    let info = bounded(
        "inspect",
        Duration::from_secs(15),
        m.inspect(key, InspectOptions::new()),
    )
    .await
    .expect("inspect");
    info[0].holder().map(|h| (h.owner.clone(), h.fencing_token))
}

/// A schema created by a provider with the default settings (the DDL takes
/// a global advisory lock: a provider with a tiny statement timeout could
/// time out waiting for another test's DDL).
async fn create_schema(url: &str, schema: &str) -> PostgresProvider {
    connect(PostgresConfig::from_url(url).schema(schema)).await
}

/// No backend of `app` is left inside a transaction.
async fn assert_no_open_transaction(client: &Client, app: &str) {
    let open: Vec<Backend> = backends(client, app)
        .await
        .into_iter()
        .filter(|b| b.state.starts_with("idle in transaction"))
        .collect();
    assert!(
        open.is_empty(),
        "connections left in a transaction: {open:?}"
    );
}

// ---------------------------------------------------------------------------
// 1. PostgreSQL restarted mid-run
// ---------------------------------------------------------------------------

/// What one worker call did.
#[derive(Debug)]
struct Call {
    at: Instant,
    took: Duration,
    /// The fencing token, or the error's text.
    outcome: Result<u64, String>,
}

/// Workers acquire and release their own keys in a loop while the server
/// is killed (SIGKILL, every backend) and started again on the same data:
/// during the outage every call returns a typed backend error within its
/// bound, the provider's own direct calls too; afterwards the same provider
/// works again by itself (workers, direct calls, the LISTEN connection, a
/// waiter that waited across the outage), no lock committed before is
/// lost, and every fencing token after the restart is higher than every
/// one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_run_gives_typed_errors_and_the_same_provider_recovers() {
    // A private server (it is killed): its schema goes with its directory.
    let server = PostgresServer::start();
    let url = server.url();
    let schema = unique("lockstep_faults");
    let app = unique("lf_restart");
    // Short timeouts: calls during the outage must fail fast.
    let statement_timeout = Duration::from_secs(1);
    let connect_timeout = Duration::from_secs(1);
    let provider = connect(
        PostgresConfig::from_url(with_app_name(&url, &app))
            .schema(&schema)
            .statement_timeout(statement_timeout)
            .connect_timeout(connect_timeout)
            .pool_size(4),
    )
    .await;
    let m = module(&provider);
    // The bound on any one call: a connection attempt, a statement and the
    // client's margin, plus slack for a loaded machine.
    let bound = connect_timeout + statement_timeout + Duration::from_secs(4);
    until(
        "the LISTEN connection is up",
        Duration::from_secs(10),
        async || provider.is_listening(),
    )
    .await;

    // Committed before the crash: a lock without expiry, and a gate a
    // waiter waits for across the outage.
    let kept = m
        .acquire("kept", AcquireOptions::new().owner_id("survivor"))
        .await
        .expect("acquire kept");
    let gate = m
        .acquire("gate", AcquireOptions::new().owner_id("gatekeeper"))
        .await
        .expect("acquire gate");
    let waiter = {
        let m = m.clone();
        tokio::spawn(async move {
            m.acquire(
                "gate",
                AcquireOptions::new()
                    .owner_id("patient")
                    .expire(Duration::from_secs(30))
                    .timeout(Duration::from_secs(90)),
            )
            .await
        })
    };
    until("the waiter waits", Duration::from_secs(10), async || {
        provider.waiting_keys() == 1
    })
    .await;

    // The workers: each its own owner and keys (re-entrant, so a release
    // lost in the outage never blocks the next round).
    let stop = Arc::new(AtomicBool::new(false));
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (m, stop, calls) = (m.clone(), Arc::clone(&stop), Arc::clone(&calls));
            tokio::spawn(async move {
                let keys = vec![format!("w{w}a"), format!("w{w}b")];
                while !stop.load(Ordering::Acquire) {
                    let start = Instant::now();
                    let r = bounded(
                        "a worker's acquire",
                        bound + Duration::from_millis(500),
                        m.acquire(
                            keys.clone(),
                            AcquireOptions::new()
                                .owner_id(format!("w{w}"))
                                .expire(Duration::from_secs(3))
                                .timeout(Duration::from_millis(500)),
                        ),
                    )
                    .await;
                    let outcome = match r {
                        Ok(lease) => {
                            let token = lease.fencing_token();
                            match bounded("a worker's release", bound, lease.release()).await {
                                Ok(_) => Ok(token),
                                Err(e) => {
                                    assert!(e.is_backend(), "release: untyped error {e:?}");
                                    Err(format!("release: {e}"))
                                }
                            }
                        }
                        Err(e) => {
                            assert!(e.is_backend(), "acquire: not a backend error: {e:?}");
                            Err(format!("acquire: {e}"))
                        }
                    };
                    let failed = outcome.is_err();
                    calls.lock().unwrap().push(Call {
                        at: start,
                        took: start.elapsed(),
                        outcome,
                    });
                    if failed {
                        sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    let successes_since = |since: Instant| {
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.at >= since && c.outcome.is_ok())
            .count()
    };
    let started = Instant::now();
    until("the workers run", Duration::from_secs(20), async || {
        successes_since(started) >= 10
    })
    .await;

    // The crash.
    let killed_at = Instant::now();
    let mut server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.kill();
        server
    })
    .await
    .unwrap();
    let tokens_before: Vec<u64> = calls
        .lock()
        .unwrap()
        .iter()
        .filter_map(|c| c.outcome.as_ref().ok().copied())
        .collect();
    let max_before = tokens_before
        .iter()
        .copied()
        .chain([kept.fencing_token(), gate.fencing_token()])
        .max()
        .unwrap();

    // The outage: typed errors, each within its bound.
    until(
        "the provider sees the LISTEN connection drop",
        Duration::from_secs(10),
        async || !provider.is_listening(),
    )
    .await;
    until(
        "the workers get errors during the outage",
        Duration::from_secs(20),
        async || {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.at >= killed_at && c.outcome.is_err())
                .count()
                >= 4
        },
    )
    .await;
    let outage_calls: Vec<(&str, Result<(), LockError>, Duration)> = vec![
        {
            let t = Instant::now();
            let r = bounded(
                "acquire during the outage",
                bound,
                m.acquire("k", AcquireOptions::new().owner_id("o")),
            )
            .await;
            ("acquire", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = bounded(
                "waiting acquire during the outage",
                bound + Duration::from_secs(1),
                m.acquire(
                    "k",
                    AcquireOptions::new()
                        .owner_id("o")
                        .timeout(Duration::from_secs(1)),
                ),
            )
            .await;
            ("waiting acquire", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = bounded(
                "release during the outage",
                bound,
                m.release("kept", ReleaseOptions::new().owner_id("survivor")),
            )
            .await;
            ("release", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = bounded(
                "extend during the outage",
                bound,
                m.extend(
                    "kept",
                    ExtendOptions::new(Duration::from_secs(60)).owner_id("survivor"),
                ),
            )
            .await;
            ("extend", r, t.elapsed())
        },
        {
            let t = Instant::now();
            let r = bounded(
                "inspect during the outage",
                bound,
                m.inspect("kept", InspectOptions::new()),
            )
            .await;
            ("inspect", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = bounded(
                "execute during the outage",
                bound + Duration::from_secs(1),
                m.execute(
                    "k",
                    ExecuteOptions::new().timeout(Duration::from_secs(1)),
                    |_| async { panic!("the job ran during the outage") },
                ),
            )
            .await;
            ("execute", r, t.elapsed())
        },
    ];
    for (what, r, took) in &outage_calls {
        match r {
            Err(e) if e.is_backend() && e.is_transient() => {
                eprintln!("outage: {what} -> {e} ({took:?})");
            }
            other => panic!("{what} during the outage: {other:?}, not a transient backend error"),
        }
    }
    assert!(
        !waiter.is_finished(),
        "the waiter gave up during the outage"
    );

    // The restart, on the same port and data.
    let restarted_at = Instant::now();
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    eprintln!("restart took {:?}", restarted_at.elapsed());

    // The same provider recovers: workers, LISTEN, direct calls.
    until(
        "the workers succeed again after the restart",
        Duration::from_secs(30),
        async || successes_since(restarted_at) >= 6,
    )
    .await;
    until(
        "the LISTEN connection is back",
        Duration::from_secs(15),
        async || provider.is_listening(),
    )
    .await;
    let check = raw(&url).await;
    let listen: Vec<Backend> = backends(&check, &app)
        .await
        .into_iter()
        .filter(Backend::is_listen)
        .collect();
    assert_eq!(listen.len(), 1, "one LISTEN backend on the new server");

    let lease = bounded(
        "acquire after the restart",
        bound,
        m.acquire("k", AcquireOptions::new().owner_id("o")),
    )
    .await
    .expect("acquire after the restart, on the same provider");
    assert!(
        lease.fencing_token() > max_before,
        "token {} after the restart, up to {max_before} before",
        lease.fencing_token()
    );
    assert!(lease.release().await.expect("release after the restart"));

    // Committed before: still there.
    assert_eq!(
        holder(&m, "kept").await,
        Some((Some("survivor".into()), kept.fencing_token()))
    );
    assert!(kept.release().await.expect("release kept"));
    // The waiter that waited across the outage gets the gate once it is
    // released (woken by the notification, or its fallback).
    assert!(gate.release().await.expect("release gate"));
    let got = bounded("the waiter", Duration::from_secs(15), waiter)
        .await
        .unwrap()
        .expect("the waiter gets the gate after the restart");
    assert!(got.fencing_token() > max_before);
    assert!(got.release().await.unwrap());

    stop.store(true, Ordering::Release);
    for w in workers {
        bounded("a worker stops", Duration::from_secs(30), w)
            .await
            .expect("a worker panicked");
    }
    {
        let calls = calls.lock().unwrap();
        let after: Vec<u64> = calls
            .iter()
            .filter(|c| c.at >= restarted_at)
            .filter_map(|c| c.outcome.as_ref().ok().copied())
            .collect();
        assert!(
            after.iter().all(|t| *t > max_before),
            "a token after the restart is not above {max_before}: {after:?}"
        );
        let errors = calls.iter().filter(|c| c.outcome.is_err()).count();
        let slowest = calls.iter().map(|c| c.took).max().unwrap();
        eprintln!(
            "{} worker calls, {errors} typed errors, slowest {slowest:?}",
            calls.len()
        );
    }

    // Nothing left held: what the workers took was released (or undone);
    // a release lost in the outage lets its lease (3 s) run out.
    until("undos finish", Duration::from_secs(20), async || {
        provider.pending_undos() == 0
    })
    .await;
    until(
        "no worker lock is left",
        Duration::from_secs(15),
        async || {
            m.locks(ListOptions::new().prefix("w"))
                .await
                .is_ok_and(|l| l.is_empty())
        },
    )
    .await;
    m.shutdown().await;
    drop(server);
}

// ---------------------------------------------------------------------------
// 2. Backends killed with pg_terminate_backend
// ---------------------------------------------------------------------------

/// When a round of the churn began, and how it ended.
type Round = (Instant, Result<(), String>);

/// The pooled connections' backends are terminated again and again while a
/// task takes and releases three keys together: every failure is a typed
/// backend error, the task keeps succeeding, a lock held across the kills
/// stays held, no key is ever left held alone (all or nothing), and no
/// connection is left inside a transaction. After a last kill, each kind of
/// call succeeds (at most one typed error first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_pool_backends_leave_no_half_held_lock() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let app = unique("lf_pool");
    let provider = connect(
        PostgresConfig::from_url(with_app_name(&url, &app))
            .schema(&schema)
            .statement_timeout(Duration::from_secs(2))
            .pool_size(4),
    )
    .await;
    let m = module(&provider);
    let check = raw(&url).await;
    let bound = Duration::from_secs(10);

    let kept = m
        .acquire(
            "kept",
            AcquireOptions::new()
                .owner_id("a")
                .expire(Duration::from_secs(120)),
        )
        .await
        .expect("acquire kept");

    let keys = ["x", "y", "z"];
    let stop = Arc::new(AtomicBool::new(false));
    let rounds: Arc<Mutex<Vec<Round>>> = Arc::default();
    let churn = {
        let (m, stop, rounds) = (m.clone(), Arc::clone(&stop), Arc::clone(&rounds));
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let at = Instant::now();
                let r = bounded(
                    "the churn's acquire",
                    bound,
                    m.acquire(
                        keys.to_vec(),
                        AcquireOptions::new()
                            .owner_id("c")
                            .expire(Duration::from_secs(10))
                            .timeout(Duration::from_secs(2)),
                    ),
                )
                .await;
                let outcome = match r {
                    Ok(lease) => {
                        assert_eq!(lease.fencing_tokens().count(), 3);
                        match bounded("the churn's release", bound, lease.release()).await {
                            Ok(_) => Ok(()),
                            Err(e) => {
                                assert!(e.is_backend(), "release: {e:?}");
                                Err(e.to_string())
                            }
                        }
                    }
                    Err(e) => {
                        assert!(e.is_backend(), "acquire: {e:?}");
                        Err(e.to_string())
                    }
                };
                rounds.lock().unwrap().push((at, outcome));
            }
        })
    };
    let ok_since = |since: Instant| {
        rounds
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, r)| *at >= since && r.is_ok())
            .count()
    };

    let mut killed = 0;
    for _ in 0..5 {
        let since = Instant::now();
        until("the churn runs", Duration::from_secs(20), async || {
            ok_since(since) >= 3
        })
        .await;
        let mut pooled = Vec::new();
        until(
            "pooled backends show in pg_stat_activity",
            Duration::from_secs(10),
            async || {
                pooled = backends(&check, &app)
                    .await
                    .into_iter()
                    .filter(|b| !b.is_listen())
                    .map(|b| b.pid)
                    .collect();
                !pooled.is_empty()
            },
        )
        .await;
        terminate(&check, &app, &pooled).await;
        killed += pooled.len();
        // A split: only some keys held would show now or never. This
        // inspect may be the first call on a connection whose backend is
        // gone: a typed error or two (one per dead pooled connection) first.
        let mut inspected = None;
        for _ in 0..5 {
            match bounded(
                "inspect",
                bound,
                m.inspect(keys.to_vec(), InspectOptions::new()),
            )
            .await
            {
                Ok(info) => {
                    inspected = Some(info);
                    break;
                }
                Err(e) => assert!(e.is_backend(), "inspect after the kill: {e:?}"),
            }
        }
        let held: Vec<bool> = inspected
            .expect("inspect succeeds after the kill, within 5 tries")
            .iter()
            .map(|i| matches!(i.state, LockState::Held(_)))
            .collect();
        assert!(
            held.iter().all(|h| *h) || held.iter().all(|h| !*h),
            "keys held apart: {held:?}"
        );
    }
    let since = Instant::now();
    until(
        "the churn succeeds after the last kill",
        Duration::from_secs(20),
        async || ok_since(since) >= 3,
    )
    .await;
    stop.store(true, Ordering::Release);
    bounded("the churn stops", Duration::from_secs(30), churn)
        .await
        .expect("the churn panicked");
    let failures = rounds
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.1.is_err())
        .count();
    eprintln!(
        "{killed} pooled backends terminated; {} rounds, {failures} typed errors",
        rounds.lock().unwrap().len()
    );

    // A last kill, then one call of each kind: at most one typed error
    // before it succeeds.
    let pooled: Vec<i32> = backends(&check, &app)
        .await
        .into_iter()
        .filter(|b| !b.is_listen())
        .map(|b| b.pid)
        .collect();
    terminate(&check, &app, &pooled).await;
    let mut first_errors = Vec::new();
    macro_rules! at_most_one_error {
        ($what:expr, $call:expr) => {{
            let mut result = bounded($what, bound, $call).await;
            if let Err(e) = &result {
                assert!(e.is_backend(), "{}: {e:?}", $what);
                first_errors.push(format!("{}: {e}", $what));
                result = bounded($what, bound, $call).await;
            }
            result.unwrap_or_else(|e| panic!("{} after the kill: {e:?}", $what))
        }};
    }
    let fresh = at_most_one_error!(
        "acquire",
        m.acquire(
            vec!["f1", "f2"],
            AcquireOptions::new()
                .owner_id("b")
                .expire(Duration::from_secs(60))
        )
    );
    at_most_one_error!(
        "extend",
        m.extend(
            "kept",
            ExtendOptions::new(Duration::from_secs(120)).owner_id("a")
        )
    );
    let listed = at_most_one_error!("list", m.locks(ListOptions::new()));
    let mut listed: Vec<String> = listed.into_iter().map(|l| l.key).collect();
    listed.sort();
    // Released (or undone) by the churn: x, y and z; a release that failed
    // leaves all three until their lease ends.
    assert!(
        listed == ["f1", "f2", "kept"] || listed == ["f1", "f2", "kept", "x", "y", "z"],
        "locks after the kills: {listed:?}"
    );
    assert!(at_most_one_error!(
        "release",
        m.release(vec!["f1", "f2"], ReleaseOptions::new().owner_id("b"))
    ));
    drop(fresh);
    assert_eq!(
        at_most_one_error!(
            "release_all",
            m.release_all(ReleaseOptions::new().owner_id("b"))
        ),
        0
    );
    eprintln!("first calls after the last kill: {first_errors:?}");

    // The lock held across the kills is intact.
    assert_eq!(
        holder(&m, "kept").await,
        Some((Some("a".into()), kept.fencing_token()))
    );
    assert!(kept.release().await.expect("release kept"));
    until("undos finish", Duration::from_secs(20), async || {
        provider.pending_undos() == 0
    })
    .await;
    until(
        "x, y and z are free (all together)",
        Duration::from_secs(15),
        async || {
            let s = states(&m, &keys).await;
            let held = s.iter().filter(|s| matches!(s, LockState::Held(_))).count();
            assert!(held == 0 || held == 3, "keys held apart: {s:?}");
            held == 0
        },
    )
    .await;
    assert_no_open_transaction(&check, &app).await;
    m.shutdown().await;
}

/// The LISTEN connection's backend is terminated while a waiter waits: the
/// provider reconnects (a new LISTEN backend, `is_listening()` again) and
/// the waiter gets the lock once it is released, both when the release
/// comes after the reconnect and when it comes right after the kill (its
/// notification lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listen_backend_reconnects_and_waiters_still_get_the_lock() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let app = unique("lf_listen");
    let holder_provider = create_schema(&url, &schema).await;
    let holders = module(&holder_provider);
    let provider = connect(
        PostgresConfig::from_url(with_app_name(&url, &app))
            .schema(&schema)
            .create_schema(false),
    )
    .await;
    let m = module(&provider);
    let check = raw(&url).await;

    let listen_pid = async || -> Option<i32> {
        let l: Vec<i32> = backends(&check, &app)
            .await
            .into_iter()
            .filter(Backend::is_listen)
            .map(|b| b.pid)
            .collect();
        assert!(l.len() <= 1, "more than one LISTEN backend: {l:?}");
        l.first().copied()
    };

    for (round, release_at_once) in [(0, false), (1, true)] {
        let key = format!("gate{round}");
        until("listening", Duration::from_secs(15), async || {
            provider.is_listening()
        })
        .await;
        let mut old = None;
        until(
            "the LISTEN backend shows",
            Duration::from_secs(10),
            async || {
                old = listen_pid().await;
                old.is_some()
            },
        )
        .await;
        let old = old.unwrap();
        let mut held = Some(
            holders
                .acquire(key.as_str(), AcquireOptions::new().owner_id("h"))
                .await
                .expect("the holder acquires"),
        );
        let waiter = {
            let (m, key) = (m.clone(), key.clone());
            tokio::spawn(async move {
                m.acquire(
                    key,
                    AcquireOptions::new()
                        .owner_id("w")
                        .expire(Duration::from_secs(30))
                        .timeout(Duration::from_secs(30)),
                )
                .await
            })
        };
        until("the waiter waits", Duration::from_secs(10), async || {
            provider.waiting_keys() == 1
        })
        .await;

        terminate(&check, &app, &[old]).await;
        if release_at_once {
            // While the provider is not listening (it reconnects after a
            // pause): this NOTIFY is lost. Should the provider be back
            // already, the release still comes first after the kill.
            let mut down = false;
            until(
                "the provider notices the lost LISTEN connection",
                Duration::from_secs(10),
                async || {
                    down = !provider.is_listening();
                    down || listen_pid().await.is_some_and(|p| p != old)
                },
            )
            .await;
            let held = held.take().unwrap();
            assert!(held.release().await.expect("release"));
            eprintln!("released while the provider was not listening: {down}");
        }
        until(
            "a new LISTEN backend, and is_listening()",
            Duration::from_secs(15),
            async || provider.is_listening() && listen_pid().await.is_some_and(|p| p != old),
        )
        .await;
        assert!(!waiter.is_finished() || release_at_once);
        if let Some(held) = held.take() {
            assert!(held.release().await.expect("release"));
        }
        let got = bounded("the waiter", Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .expect("the waiter gets the lock");
        assert_eq!(holder(&m, &key).await.map(|h| h.0), Some(Some("w".into())));
        assert!(got.release().await.unwrap());
    }
    m.shutdown().await;
    holders.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. A paused holder loses its lease to a successor
// ---------------------------------------------------------------------------

/// A holder takes a 1 s lease and stops renewing (paused); a successor in
/// another provider, waiting on the key, gets it once the lease has run
/// out, with a higher fencing token. The old holder's `extend` then fails
/// with `NotOwner` and its release frees nothing (`false`, as a release of
/// a lock one does not hold); the successor keeps the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_loses_its_lease_to_a_successor() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let old_provider = create_schema(&url, &schema).await;
    let old = module(&old_provider);
    let next_provider = connect(PostgresConfig::from_url(&url).schema(&schema)).await;
    let next = module(&next_provider);

    let mut lease = old
        .acquire(
            "k",
            AcquireOptions::new()
                .owner_id("paused")
                .expire(Duration::from_secs(1)),
        )
        .await
        .expect("the holder acquires");
    let valid_until = lease.valid_until().unwrap();
    let successor = {
        let next = next.clone();
        tokio::spawn(async move {
            let r = next
                .acquire(
                    "k",
                    AcquireOptions::new()
                        .owner_id("successor")
                        .expire(Duration::from_secs(30))
                        .timeout(Duration::from_secs(20)),
                )
                .await;
            (r, Instant::now())
        })
    };
    until("the successor waits", Duration::from_secs(10), async || {
        next_provider.waiting_keys() == 1
    })
    .await;
    let (got, got_at) = bounded("the successor", Duration::from_secs(15), successor)
        .await
        .unwrap();
    let got = got.expect("the successor gets the lock after the lease ran out");
    assert!(
        got_at >= valid_until,
        "the successor got the lock {:?} before the holder's lease ended",
        valid_until - got_at
    );
    assert!(
        got.fencing_token() > lease.fencing_token(),
        "successor's token {} not above {}",
        got.fencing_token(),
        lease.fencing_token()
    );

    // The holder wakes up: its lease is gone.
    match lease.extend(Duration::from_secs(10)).await {
        Err(LockError::NotOwner { key }) => assert_eq!(key, "k"),
        other => panic!("extend by the old holder: {other:?}"),
    }
    match old
        .extend(
            "k",
            ExtendOptions::new(Duration::from_secs(10)).owner_id("paused"),
        )
        .await
    {
        Err(e @ LockError::NotOwner { .. }) => assert!(e.is_lost()),
        other => panic!("extend by the old holder: {other:?}"),
    }
    assert!(
        !old.release("k", ReleaseOptions::new().owner_id("paused"))
            .await
            .expect("release by the old holder"),
        "the old holder released the successor's lock"
    );
    assert!(!lease.release().await.expect("release of the lost lease"));
    match old
        .acquire("k", AcquireOptions::new().owner_id("paused"))
        .await
    {
        Err(e @ LockError::Contended { .. }) => assert!(e.is_contended()),
        other => panic!("the old holder took the lock back: {other:?}"),
    }
    assert_eq!(
        holder(&next, "k").await,
        Some((Some("successor".into()), got.fencing_token()))
    );
    assert!(got.release().await.unwrap());
    old.shutdown().await;
    next.shutdown().await;
}

/// `execute` renews by itself; its holder is "paused" by making every
/// renewal impossible: the key's advisory lock is held from an open
/// transaction, so each renewal blocks until the statement timeout. The
/// lease runs out, the job's `lost` signal fires, the successor (waiting
/// in another provider) gets the lock with a higher token once the block
/// ends, `execute` returns `LeaseLost`, and its final release does not free
/// the successor's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_whose_renewals_are_blocked_loses_the_lease_to_a_successor() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let next_provider = create_schema(&url, &schema).await;
    let next = module(&next_provider);
    let holder_provider = connect(
        PostgresConfig::from_url(&url)
            .schema(&schema)
            .create_schema(false)
            .statement_timeout(Duration::from_millis(300)),
    )
    .await;
    let holders = module(&holder_provider);

    let lease = Duration::from_millis(1500);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<u64>();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let job = {
        let holders = holders.clone();
        tokio::spawn(async move {
            holders
                .execute(
                    "job",
                    ExecuteOptions::new()
                        .expire(lease)
                        .timeout(Duration::from_secs(5)),
                    |held| async move {
                        let _ = started_tx.send(held.fencing_token());
                        // Paused: the job does not stop when the lease is
                        // lost; it says so and goes on until told.
                        if timeout(Duration::from_secs(20), held.cancelled())
                            .await
                            .is_ok()
                        {
                            let _ = lost_tx.send(());
                        }
                        let _ = timeout(Duration::from_secs(30), finish_rx).await;
                    },
                )
                .await
        })
    };
    let job_token = bounded("the job starts", Duration::from_secs(10), started_rx)
        .await
        .expect("the job started");
    let successor = {
        let next = next.clone();
        tokio::spawn(async move {
            next.acquire(
                "job",
                AcquireOptions::new()
                    .owner_id("successor")
                    .expire(Duration::from_secs(30))
                    .timeout(Duration::from_secs(30)),
            )
            .await
        })
    };
    until("the successor waits", Duration::from_secs(10), async || {
        next_provider.waiting_keys() == 1
    })
    .await;

    let blocker = block_key(&url, &schema, "job").await;
    let blocked_at = Instant::now();
    bounded(
        "the lease is lost while renewals are blocked",
        lease + Duration::from_secs(10),
        lost_rx,
    )
    .await
    .expect("the job saw its lease lost");
    eprintln!("lost {:?} after the block", blocked_at.elapsed());
    assert!(
        !successor.is_finished(),
        "the successor got in through the block"
    );
    unblock(blocker).await;

    let got = bounded("the successor", Duration::from_secs(15), successor)
        .await
        .unwrap()
        .expect("the successor gets the lock");
    assert!(
        got.fencing_token() > job_token,
        "successor's token {} not above the job's {job_token}",
        got.fencing_token()
    );
    let _ = finish_tx.send(());
    let result = bounded("execute returns", Duration::from_secs(15), job)
        .await
        .unwrap();
    match result {
        Err(LockError::LeaseLost { keys }) => assert_eq!(keys, ["job"]),
        other => panic!("execute after losing its lease: {other:?}"),
    }
    assert_eq!(
        holder(&next, "job").await,
        Some((Some("successor".into()), got.fencing_token())),
        "execute's release freed the successor's lock"
    );
    assert!(got.release().await.unwrap());
    holders.shutdown().await;
    next.shutdown().await;
}

// ---------------------------------------------------------------------------
// 4. Statement timeouts and wait deadlines
// ---------------------------------------------------------------------------

/// With a 300 ms statement timeout, calls on a key whose statements block
/// server-side fail with a typed, transient backend error in bounded time;
/// a multi-key acquisition leaves none of its keys held; the pool (one
/// connection) stays usable and no connection is left inside a
/// transaction; once the block ends, nothing is held and the key can be
/// taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_is_a_typed_error_and_leaves_nothing_behind() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let other_provider = create_schema(&url, &schema).await;
    let other = module(&other_provider);
    let app = unique("lf_stmt");
    let statement_timeout = Duration::from_millis(300);
    let provider = connect(
        PostgresConfig::from_url(with_app_name(&url, &app))
            .schema(&schema)
            .create_schema(false)
            .statement_timeout(statement_timeout)
            .pool_size(1),
    )
    .await;
    let m = module(&provider);
    let check = raw(&url).await;
    // The server's timeout, the client's 1 s margin behind it, and slack.
    let bound = statement_timeout + Duration::from_secs(3);

    let warm = m
        .acquire("free", AcquireOptions::new().owner_id("a"))
        .await
        .expect("acquire before the block");
    assert!(warm.release().await.unwrap());

    let blocker = block_key(&url, &schema, "blocked").await;
    let attempts: Vec<(&str, Result<(), LockError>, Duration)> = vec![
        {
            let t = Instant::now();
            let r = m
                .acquire(
                    "blocked",
                    AcquireOptions::new()
                        .owner_id("a")
                        .expire(Duration::from_secs(30)),
                )
                .await;
            ("acquire", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = m
                .acquire(
                    vec!["free", "blocked", "free2"],
                    AcquireOptions::new()
                        .owner_id("a")
                        .expire(Duration::from_secs(30)),
                )
                .await;
            ("multi-key acquire", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = m
                .release("blocked", ReleaseOptions::new().owner_id("a"))
                .await;
            ("release", r.map(|_| ()), t.elapsed())
        },
        {
            let t = Instant::now();
            let r = m
                .extend(
                    "blocked",
                    ExtendOptions::new(Duration::from_secs(30)).owner_id("a"),
                )
                .await;
            ("extend", r, t.elapsed())
        },
    ];
    for (what, r, took) in attempts {
        match r {
            Err(e) if e.is_backend() && e.is_transient() => {
                eprintln!("{what} on a blocked key: {e} after {took:?}");
                assert!(took <= bound, "{what} took {took:?}, more than {bound:?}");
            }
            other => panic!(
                "{what} on a blocked key: {other:?} after {took:?}, not a timeout \
                 (did the blocker block? lock_keys' hashing may have changed)"
            ),
        }
    }
    // The one pooled connection is usable (not inside an aborted
    // transaction), on other keys, while the block lasts.
    let lease = bounded(
        "acquire during the block",
        bound,
        m.acquire(vec!["free", "free2"], AcquireOptions::new().owner_id("b")),
    )
    .await
    .expect("the pool is usable after the timeouts");
    assert!(lease.release().await.unwrap());
    assert_no_open_transaction(&check, &app).await;
    assert_eq!(
        states(&m, &["free", "free2"]).await,
        [LockState::Free, LockState::Free]
    );

    unblock(blocker).await;
    until("undos finish", Duration::from_secs(20), async || {
        provider.pending_undos() == 0
    })
    .await;
    until(
        "no statement of the provider is still running",
        Duration::from_secs(10),
        async || {
            backends(&check, &app)
                .await
                .iter()
                .all(|b| b.state != "active")
        },
    )
    .await;
    assert_eq!(
        states(&m, &["blocked", "free", "free2"]).await,
        [LockState::Free, LockState::Free, LockState::Free],
        "a lock was left behind by a timed-out statement"
    );
    let taken = other
        .acquire("blocked", AcquireOptions::new().owner_id("c"))
        .await
        .expect("the key is free once the block ends");
    assert!(taken.release().await.unwrap());
    let again = bounded(
        "acquire after the block",
        bound,
        m.acquire("blocked", AcquireOptions::new().owner_id("a")),
    )
    .await
    .expect("the provider takes the key once the block ends");
    assert!(again.release().await.unwrap());
    assert_no_open_transaction(&check, &app).await;
    m.shutdown().await;
    other.shutdown().await;
}

/// A waiting acquire on a key held by another owner stops at its deadline
/// with `TimedOut`, and `execute` too (its job not run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_stops_at_its_deadline() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let holder_provider = create_schema(&url, &schema).await;
    let holders = module(&holder_provider);
    let provider = connect(PostgresConfig::from_url(&url).schema(&schema)).await;
    let m = module(&provider);
    let held = holders
        .acquire("held", AcquireOptions::new().owner_id("h"))
        .await
        .unwrap();
    let wait = Duration::from_millis(700);
    let slack = Duration::from_secs(2);

    let t = Instant::now();
    let r = bounded(
        "a waiting acquire",
        wait + Duration::from_secs(10),
        m.acquire("held", AcquireOptions::new().owner_id("w").timeout(wait)),
    )
    .await;
    let took = t.elapsed();
    match r {
        Err(e @ LockError::TimedOut { .. }) => {
            assert_eq!(e.to_string(), "Timed-out acquiring lock.")
        }
        other => panic!("a wait on a held key: {other:?}"),
    }
    assert!(took >= wait, "gave up after {took:?}, before its {wait:?}");
    assert!(
        took <= wait + slack,
        "stopped {took:?} after it began, not at {wait:?}"
    );

    let ran = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let r = bounded(
        "a waiting execute",
        wait + Duration::from_secs(10),
        m.execute("held", ExecuteOptions::new().timeout(wait), {
            let ran = Arc::clone(&ran);
            |_| async move { ran.store(true, Ordering::Release) }
        }),
    )
    .await;
    let took = t.elapsed();
    assert!(matches!(r, Err(LockError::TimedOut { .. })), "{r:?}");
    assert!(!ran.load(Ordering::Acquire), "the job ran");
    assert!(
        took >= wait && took <= wait + slack,
        "execute stopped after {took:?}"
    );
    assert_eq!(provider.waiting_keys(), 0, "a waiter left its registration");
    assert_eq!(
        holder(&m, "held").await,
        Some((Some("h".into()), held.fencing_token()))
    );
    assert!(held.release().await.unwrap());
    m.shutdown().await;
    holders.shutdown().await;
}

/// A waiting acquire whose statement blocks server-side (the key's
/// advisory lock held from an open transaction) with the default 5 s
/// statement timeout: the wait's 700 ms deadline must still end it, not
/// the statement timeout; and once the block ends, no lock is left behind
/// by the abandoned statement. (It failed before an attempt's statement
/// was bounded by the wait's deadline and cancelled on the server: the
/// wait ended at the statement timeout, after 5 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_blocked_server_side_stops_at_its_deadline() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let other_provider = create_schema(&url, &schema).await;
    let other = module(&other_provider);
    let app = unique("lf_wait");
    let provider = connect(
        PostgresConfig::from_url(with_app_name(&url, &app))
            .schema(&schema)
            .create_schema(false),
    )
    .await;
    let m = module(&provider);
    let check = raw(&url).await;
    let wait = Duration::from_millis(700);
    let slack = Duration::from_secs(2);

    let blocker = block_key(&url, &schema, "blocked").await;
    let t = Instant::now();
    let r = bounded(
        "a waiting acquire on a blocked key",
        Duration::from_secs(30),
        m.acquire(
            "blocked",
            AcquireOptions::new()
                .owner_id("w")
                .expire(Duration::from_secs(60))
                .timeout(wait),
        ),
    )
    .await;
    let took = t.elapsed();
    eprintln!("a wait of {wait:?} on a blocked key ended after {took:?}: {r:?}");
    // Let the block go before asserting, so that a failure leaves nothing.
    unblock(blocker).await;
    match &r {
        Err(e) if e.is_backend() || e.is_contended() => {}
        other => panic!("a wait on a blocked key: {other:?}"),
    }
    until("undos finish", Duration::from_secs(20), async || {
        provider.pending_undos() == 0
    })
    .await;
    until(
        "no statement of the provider is still running",
        Duration::from_secs(10),
        async || {
            backends(&check, &app)
                .await
                .iter()
                .all(|b| b.state != "active")
        },
    )
    .await;
    assert_eq!(
        states(&m, &["blocked"]).await,
        [LockState::Free],
        "the abandoned statement left a lock behind"
    );
    let taken = other
        .acquire("blocked", AcquireOptions::new().owner_id("c"))
        .await
        .expect("the key is free");
    assert!(taken.release().await.unwrap());
    assert_no_open_transaction(&check, &app).await;
    m.shutdown().await;
    other.shutdown().await;
    // Last, so that the checks above ran either way.
    assert!(
        took <= wait + slack,
        "a wait of {wait:?} ended only after {took:?} (the statement's timeout, not the wait's)"
    );
}

/// Sends `signal` to process `pid` (a backend of a private server).
fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A backend that stops answering altogether (SIGSTOP: the server's own
/// statement timeout cannot fire in it), on a private server: the
/// acquisition fails on the client's timeout with a typed outcome-unknown
/// error in bounded time, the pool (one connection) becomes usable again
/// without the stuck connection, and when the backend resumes (SIGCONT)
/// and runs the abandoned statement, no lock is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_answering_is_a_typed_error_and_leaves_nothing_behind() {
    // A private server: stopping a backend of a shared one could stall
    // other sessions. Its schema goes with its directory.
    let server = PostgresServer::start();
    let url = server.url();
    let schema = unique("lockstep_faults");
    let app = unique("lf_stop");
    let statement_timeout = Duration::from_secs(1);
    let provider = connect(
        PostgresConfig::from_url(with_app_name(&url, &app))
            .schema(&schema)
            .statement_timeout(statement_timeout)
            .pool_size(1),
    )
    .await;
    let m = module(&provider);
    let check = raw(&url).await;
    let warm = m
        .acquire("warm", AcquireOptions::new().owner_id("a"))
        .await
        .expect("acquire before the stop");
    assert!(warm.release().await.unwrap());
    let pooled: Vec<i32> = backends(&check, &app)
        .await
        .into_iter()
        .filter(|b| !b.is_listen())
        .map(|b| b.pid)
        .collect();
    assert_eq!(pooled.len(), 1, "one pooled backend: {pooled:?}");
    let stuck = pooled[0];
    signal(stuck, "STOP");

    // The client's bound: the statement timeout plus its 1 s margin.
    let t = Instant::now();
    let r = bounded(
        "acquire on a stopped backend",
        Duration::from_secs(20),
        m.acquire(
            "k",
            AcquireOptions::new()
                .owner_id("a")
                .expire(Duration::from_secs(60)),
        ),
    )
    .await;
    let took = t.elapsed();
    eprintln!("acquire on a stopped backend: {r:?} after {took:?}");
    let failed_in_bound = took <= statement_timeout + Duration::from_secs(4);
    let typed = matches!(&r, Err(e) if e.is_outcome_unknown());

    // The pool gets a fresh connection once the stuck one is let go.
    let mut errors = 0;
    let mut last_token = 0;
    until(
        "the pool is usable again",
        Duration::from_secs(20),
        async || match m
            .acquire("other", AcquireOptions::new().owner_id("b"))
            .await
        {
            Ok(lease) => {
                last_token = lease.fencing_token();
                lease.release().await.is_ok_and(|r| r)
            }
            Err(e) => {
                assert!(e.is_backend(), "{e:?}");
                errors += 1;
                false
            }
        },
    )
    .await;
    eprintln!("{errors} typed errors before the pool was usable again");
    until("undos finish", Duration::from_secs(30), async || {
        provider.pending_undos() == 0
    })
    .await;

    // The backend resumes and runs what was sent to it.
    signal(stuck, "CONT");
    until(
        "the resumed backend exits (its client is gone)",
        Duration::from_secs(20),
        async || !backends(&check, &app).await.iter().any(|b| b.pid == stuck),
    )
    .await;
    let left = holder(&m, "k").await;
    // Whether the resumed backend ran the abandoned acquisition: it drew a
    // token from the sequence (tokens have no other gaps here).
    let probe = m
        .acquire("probe", AcquireOptions::new().owner_id("b"))
        .await
        .expect("acquire after the resume");
    eprintln!(
        "the abandoned acquisition {} after the resume",
        if probe.fencing_token() > last_token + 1 {
            "ran (and was undone)"
        } else {
            "did not run"
        }
    );
    m.shutdown().await;
    drop(server);
    assert!(typed, "not an outcome-unknown backend error: {r:?}");
    assert!(failed_in_bound, "the acquisition took {took:?}");
    assert_eq!(left, None, "the abandoned acquisition left a lock behind");
}

/// The sweep takes each key's advisory lock as every other function does,
/// without waiting: an expired lock whose key is in use (here, blocked from
/// an open transaction) is left for a later sweep, never deleted between
/// another call's check and its write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_leaves_a_key_in_use_alone() {
    let url = shared_postgres_url();
    let own = OwnSchema::new(&url, "lockstep_faults");
    let schema = own.name().to_owned();
    let provider = create_schema(&url, &schema).await;
    let m = module(&provider);
    for key in ["busy", "idle"] {
        m.acquire(key, AcquireOptions::new().expire(Duration::from_millis(1)))
            .await
            .unwrap();
    }
    until("both leases run out", Duration::from_secs(10), async || {
        states(&m, &["busy", "idle"])
            .await
            .iter()
            .all(|s| matches!(s, LockState::Free))
    })
    .await;
    let blocker = block_key(&url, &schema, "busy").await;
    let swept = bounded(
        "a sweep beside a blocked key",
        Duration::from_secs(10),
        provider.sweep(),
    )
    .await
    .unwrap();
    assert_eq!(swept, 1, "only the idle key's row goes");
    unblock(blocker).await;
    assert_eq!(provider.sweep().await.unwrap(), 1, "then the other");
    assert_eq!(provider.sweep().await.unwrap(), 0);
    m.shutdown().await;
}
