//! The Redis provider beyond the shared contract: configuration, startup
//! failures, credentials, connections, key layout, and what happens when a
//! reply never arrives. Every test talks to a real redis-server.

mod support;

use std::time::Duration;

use lockstep::{
    AcquireOptions, BackendErrorKind, ConfigError, ExecuteOptions, LockError, LockingModule,
    RedisConfig, RedisProvider, ReleaseOptions,
};
use redis::AsyncCommands;
use support::{
    RedisServer, dropped_connects_leave_no_client, eventually, module_with, raw_connection,
    redis_provider, shared_url,
};
use tokio::time::Instant;

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

/// Waits until the lock `key` of `p` is gone from the server at `url`.
async fn wait_until_gone(p: &RedisProvider, url: &str, key: &str, what: &str) {
    let c = raw_connection(url).await;
    eventually(Duration::from_secs(5), what, || {
        let (key, mut c) = (p.lock_key(key), c.clone());
        async move { !c.exists::<_, bool>(key).await.unwrap() }
    })
    .await;
}

#[tokio::test]
async fn a_missing_url_is_medusas_startup_error() {
    let e = RedisProvider::connect(RedisConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ConfigError::MissingUrl { .. }));
    assert!(e.to_string().starts_with("No \"redisUrl\" provided"), "{e}");
}

#[tokio::test]
async fn malformed_urls_are_typed_errors_without_the_password() {
    for url in [
        "not a url",
        "http://user:s3cret@host:6379",
        "redis://:s3cret@host:notaport",
        "redis://user:s3cret@[::1",
    ] {
        let e = RedisProvider::connect(RedisConfig::from_url(url))
            .await
            .unwrap_err();
        assert!(matches!(e, ConfigError::InvalidUrl { .. }), "{url}: {e:?}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
    }
}

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn rediss_without_the_tls_feature_says_so() {
    let e = RedisProvider::connect(RedisConfig::from_url("rediss://host:6380"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`tls` cargo feature"), "{e}");
}

#[tokio::test]
async fn bad_settings_are_typed_errors() {
    let url = shared_url();
    for config in [
        RedisConfig::from_url(&url).namespace(""),
        RedisConfig::from_url(&url).namespace("has{brace"),
        RedisConfig::from_url(&url).connect_timeout(Duration::ZERO),
        RedisConfig::from_url(&url).response_timeout(Duration::MAX),
        RedisConfig::from_url(&url).pool_size(0),
    ] {
        let e = RedisProvider::connect(config).await.unwrap_err();
        assert!(matches!(e, ConfigError::InvalidSetting { .. }), "{e:?}");
    }
}

/// Nothing listens on the port: a clear error at once, not a log line.
#[tokio::test]
async fn an_unreachable_redis_fails_startup_within_the_connect_timeout() {
    let port = support::free_port();
    let config = RedisConfig::from_url(format!("redis://:pw@127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let e = RedisProvider::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    match &e {
        ConfigError::Unreachable { url, timeout, .. } => {
            assert_eq!(url, &format!("redis://:***@127.0.0.1:{port}"));
            assert_eq!(*timeout, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.to_string().contains(":pw@"));
}

/// A server that accepts TCP but never answers: the connect timeout bounds
/// startup.
#[tokio::test]
async fn a_silent_server_fails_startup_within_the_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = RedisConfig::from_url(format!("redis://127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let e = RedisProvider::connect(config).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, ConfigError::Unreachable { .. }), "{e:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn passwords_and_acl_users() {
    let server = RedisServer::start(&["--requirepass", "right-pass"]);
    let port = server.port;
    let url = |auth: &str| format!("redis://{auth}127.0.0.1:{port}");

    // No password where one is required.
    let e = RedisProvider::connect(RedisConfig::from_url(url("")))
        .await
        .unwrap_err();
    assert!(matches!(e, ConfigError::AuthFailed { .. }), "{e:?}");
    // A wrong one: typed, and never echoed.
    let e = RedisProvider::connect(RedisConfig::from_url(url(":wrong-pass@")))
        .await
        .unwrap_err();
    assert!(matches!(e, ConfigError::AuthFailed { .. }), "{e:?}");
    assert!(!e.to_string().contains("wrong-pass") && !format!("{e:?}").contains("wrong-pass"));
    // The right one works.
    let p = RedisProvider::connect(RedisConfig::from_url(url(":right-pass@")))
        .await
        .unwrap();
    let m = module_with(p);
    m.acquire("k", owner("u")).await.unwrap();

    // An ACL user limited to lockstep's namespace: its keys, and its
    // notification channels (<namespace>c:<pid>).
    let mut admin = redis::Client::open(url(":right-pass@"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for rule in [
        &[
            "SETUSER",
            "locker",
            "on",
            ">locker-pass",
            "~app:*",
            "&app:*",
            "+@all",
        ][..],
        &[
            "SETUSER",
            "keysonly",
            "on",
            ">keys-pass",
            "~app:*",
            "&*",
            "+@all",
        ][..],
    ] {
        let _: () = redis::cmd("ACL")
            .arg(rule)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let p =
        RedisProvider::connect(RedisConfig::from_url(url("locker:locker-pass@")).namespace("app:"))
            .await
            .unwrap();
    let m = module_with(p);
    let lease = m.acquire("k", owner("u")).await.unwrap();
    assert!(lease.release().await.unwrap());
    // Outside its channels: refused at startup, with a typed error.
    let e = RedisProvider::connect(
        RedisConfig::from_url(url("locker:locker-pass@")).namespace("other:"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ConfigError::AuthFailed { .. }), "{e:?}");
    // Outside its keys: a typed auth error on the call, not a panic.
    let p = RedisProvider::connect(
        RedisConfig::from_url(url("keysonly:keys-pass@")).namespace("other:"),
    )
    .await
    .unwrap();
    let e = module_with(p).acquire("k", owner("u")).await.unwrap_err();
    match e {
        LockError::Backend(b) => assert_eq!(b.kind(), BackendErrorKind::Auth, "{b}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_existing_deadpool_pool_can_be_used() {
    let pool = deadpool_redis::Config::from_url(shared_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let namespace = support::unique_namespace();
    let p = RedisProvider::from_pool(pool.clone(), &RedisConfig::default().namespace(&namespace))
        .await
        .unwrap();
    let m = module_with(p);
    let lease = m.acquire("k", owner("u")).await.unwrap();
    let mut c = pool.get().await.unwrap();
    // "u", a 12-byte nonce and the 16-byte tail (lua/prelude.lua).
    let v: Vec<u8> = c.get(format!("{namespace}{{k}}")).await.unwrap();
    assert!(v.starts_with(b"u") && v.len() == 1 + 12 + 16, "{v:?}");
    assert!(lease.release().await.unwrap());
}

/// The documented key layout, visible in Redis.
#[tokio::test]
async fn keys_live_under_the_namespace_with_hash_tags() {
    let p = redis_provider().await;
    let ns = p.namespace().to_owned();
    let m = module_with(p.clone());
    let _l = m
        .acquire(
            ["order_1", "we{ird}"],
            owner("run-1").expire(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let mut c = raw_connection(&shared_url()).await;
    let mut keys: Vec<String> = c.keys(format!("{ns}*")).await.unwrap();
    keys.sort();
    let locks: Vec<&String> = keys.iter().filter(|k| k.ends_with('}')).collect();
    assert_eq!(
        locks,
        [&format!("{ns}{{order_1}}"), &format!("{ns}{{we%7Bird%7D}}")]
    );
    assert_eq!(p.lock_key("order_1"), format!("{ns}{{order_1}}"));
    assert!(keys.contains(&format!("{ns}{{run-1}}:o")));
    assert_eq!(keys.iter().filter(|k| k.ends_with(":f")).count(), 2);
    let pttl: i64 = c.pttl(format!("{ns}{{order_1}}")).await.unwrap();
    assert!((9_000..=10_000).contains(&pttl));
}

/// Fencing state is bounded: one counter per hash slot, however many
/// distinct keys are ever locked.
#[tokio::test]
async fn fencing_state_does_not_grow_with_distinct_keys() {
    let p = redis_provider().await;
    let ns = p.namespace().to_owned();
    let m = module_with(p);
    let keys: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
    for chunk in keys.chunks(1000) {
        let lease = m
            .acquire(chunk.to_vec(), AcquireOptions::new())
            .await
            .unwrap();
        assert!(lease.release().await.unwrap());
    }
    let mut c = raw_connection(&shared_url()).await;
    let left: Vec<String> = c.keys(format!("{ns}*")).await.unwrap();
    assert!(
        left.iter().all(|k| k.ends_with("}:f")),
        "only counters remain"
    );
    assert!(
        left.len() <= 16_384,
        "{} counters for 20,000 keys",
        left.len()
    );
    assert!(
        left.len() > 10_000,
        "keys spread over slots: {}",
        left.len()
    );
}

/// A counter that fell behind (as on a replica promoted after missing
/// increments) does not hand out old tokens again: every acquisition floors
/// it by the client's clock, rounded down to 100 ms.
#[tokio::test]
async fn a_stale_fencing_counter_is_floored_by_the_clock() {
    let p = redis_provider().await;
    let ns = p.namespace().to_owned();
    let m = module_with(p);
    let lease = m.acquire("k", AcquireOptions::new()).await.unwrap();
    let first = lease.fencing_token();
    assert!(lease.release().await.unwrap());
    let mut c = raw_connection(&shared_url()).await;
    let counters: Vec<String> = c.keys(format!("{ns}*:f")).await.unwrap();
    assert_eq!(counters.len(), 1);
    // Set back, as a replica that missed the last increments would have it.
    let _: () = c.set(&counters[0], 7).await.unwrap();
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    // Tokens of the last 100 ms may repeat (documented); wait until the
    // first one is older than that, at most a few hundred ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_us() / 100_000 * 100_000 <= first {
        assert!(Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_us = now_us();
    let lease = m.acquire("k", AcquireOptions::new()).await.unwrap();
    assert!(
        lease.fencing_token() >= before_us / 100_000 * 100_000,
        "{} from a counter at 7",
        lease.fencing_token()
    );
    assert!(
        lease.fencing_token() > first,
        "went back: {} after {first}",
        lease.fencing_token()
    );
    assert!(lease.release().await.unwrap());
}

/// Two namespaces on one Redis cannot see or release each other's locks.
#[tokio::test]
async fn namespaces_are_isolated() {
    let a = module_with(redis_provider().await);
    let b = module_with(redis_provider().await);
    let _la = a.acquire("shared-name", owner("u")).await.unwrap();
    let lb = b.acquire("shared-name", owner("u")).await.unwrap();
    assert_eq!(b.release_all(ReleaseOptions::new()).await.unwrap(), 1);
    assert!(
        a.acquire("shared-name", owner("other")).await.is_err(),
        "a's lock survived"
    );
    assert!(!lb.release().await.unwrap());
}

/// Keys with glob characters, newlines, braces, non-ASCII text and the
/// maximum length are ordinary keys; distinct keys stay distinct.
#[tokio::test]
async fn hostile_keys_are_just_keys() {
    let m = module_with(redis_provider().await);
    let long = "x".repeat(lockstep::MAX_KEY_LEN);
    let keys = [
        "*",
        "a?b",
        "[ab]",
        "line\nbreak",
        "naïve ключ 鍵",
        "{tag}",
        "}",
        "%7B",
        "{",
        long.as_str(),
    ];
    let lease = m.acquire(keys, owner("u")).await.unwrap();
    assert_eq!(lease.keys().len(), keys.len());
    for k in keys {
        assert!(m.acquire(k, owner("other")).await.is_err(), "{k:?} is held");
    }
    // "*" as a key did not lock everything.
    m.acquire("plain", owner("other")).await.unwrap();
    assert!(lease.release().await.unwrap());
}

/// A lock key occupied by another type is reported, never overwritten.
#[tokio::test]
async fn a_foreign_value_is_a_typed_error() {
    let p = redis_provider().await;
    let m = module_with(p.clone());
    let mut c = raw_connection(&shared_url()).await;
    let _: () = c.hset(p.lock_key("taken"), "field", "value").await.unwrap();
    let e = m.acquire(["free", "taken"], owner("u")).await.unwrap_err();
    assert!(
        matches!(&e, LockError::ForeignValue { key } if key == "taken"),
        "{e:?}"
    );
    assert!(!m.release("taken", ReleaseOptions::new()).await.unwrap());
    let kind: String = redis::cmd("TYPE")
        .arg(p.lock_key("taken"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
    m.acquire("free", owner("u")).await.unwrap();
}

/// A server killed and restarted: calls fail with typed errors within their
/// timeouts during the outage, and the same provider works again promptly.
#[tokio::test]
async fn the_provider_recovers_after_a_redis_restart() {
    let mut server = RedisServer::start(&[]);
    let config = RedisConfig::from_url(server.url())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    m.acquire("before", owner("u")).await.unwrap();
    server.signal("KILL");
    eventually(Duration::from_secs(5), "redis is gone", || async {
        !server.is_running()
    })
    .await;
    for _ in 0..3 {
        let started = Instant::now();
        let e = m.acquire("during", owner("u")).await.unwrap_err();
        assert!(e.is_backend(), "{e:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );
    }
    server.restart();
    let back = Instant::now();
    eventually(
        Duration::from_secs(1),
        "the provider works again",
        || async { m.acquire("after", owner("u")).await.is_ok() },
    )
    .await;
    println!("recovered {:?} after the restart", back.elapsed());
}

/// A paused server: calls time out with "outcome unknown" instead of
/// hanging. The acquisition that was queued on the server runs when it
/// resumes, and lockstep undoes it: no ghost lock.
#[tokio::test]
async fn an_unanswered_acquisition_is_undone() {
    let server = RedisServer::start(&[]);
    let config = RedisConfig::from_url(server.url()).response_timeout(Duration::from_millis(200));
    let p = RedisProvider::connect(config).await.unwrap();
    let m = module_with(p.clone());
    server.signal("STOP");
    let started = Instant::now();
    let e = m.acquire("ghost", owner("u")).await.unwrap_err();
    let took = started.elapsed();
    server.signal("CONT");
    assert!(e.is_outcome_unknown(), "{e:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let mut c = raw_connection(&server.url()).await;
    eventually(
        Duration::from_secs(5),
        "the unanswered acquisition is undone",
        || {
            let key = p.lock_key("ghost");
            let mut c = c.clone();
            async move { !c.exists::<_, bool>(key).await.unwrap() }
        },
    )
    .await;
    let _: () = c.ping().await.unwrap();
    m.acquire("ghost", owner("someone-else")).await.unwrap();
}

/// The undo touches only what the lost attempt took: a hold the owner had
/// before (re-entry) survives it.
#[tokio::test]
async fn undo_keeps_an_earlier_hold_of_the_same_owner() {
    let server = RedisServer::start(&[]);
    let config = RedisConfig::from_url(server.url()).response_timeout(Duration::from_millis(200));
    let p = RedisProvider::connect(config).await.unwrap();
    let m = module_with(p.clone());
    m.acquire("mine", owner("u")).await.unwrap();
    server.signal("STOP");
    let e = m.acquire(["mine", "new"], owner("u")).await.unwrap_err();
    server.signal("CONT");
    assert!(e.is_outcome_unknown(), "{e:?}");
    wait_until_gone(&p, &server.url(), "new", "the new key is undone").await;
    assert!(
        m.acquire("mine", owner("other")).await.is_err(),
        "the earlier hold survives"
    );
}

/// Cancelling an acquisition (dropping its future) while the script is in
/// flight leaves nothing held once the server answers.
#[tokio::test]
async fn a_dropped_acquisition_leaves_nothing_held() {
    let server = RedisServer::start(&[]);
    let p = RedisProvider::connect(RedisConfig::from_url(server.url()))
        .await
        .unwrap();
    let m = module_with(p.clone());
    server.signal("STOP");
    let r =
        tokio::time::timeout(Duration::from_millis(100), m.acquire("dropped", owner("u"))).await;
    assert!(r.is_err(), "the acquisition was still in flight");
    server.signal("CONT");
    let c = raw_connection(&server.url()).await;
    eventually(
        Duration::from_secs(5),
        "the dropped acquisition is undone",
        || {
            let (key, mut c) = (p.lock_key("dropped"), c.clone());
            async move { !c.exists::<_, bool>(key).await.unwrap() }
        },
    )
    .await;
}

/// A transient renewal failure (server paused for less than the lease) is
/// retried, and the job's result comes back (Medusa's E8).
#[tokio::test]
async fn execute_survives_a_short_outage_during_renewal() {
    let server = RedisServer::start(&[]);
    let config = RedisConfig::from_url(server.url()).response_timeout(Duration::from_millis(100));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    let r = m
        .execute(
            "renewed",
            ExecuteOptions::new().expire(Duration::from_millis(1500)),
            |lost| {
                let server = &server;
                async move {
                    // Renewals every 500 ms; the pause swallows one of them.
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    server.signal("STOP");
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    server.signal("CONT");
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    !lost.is_cancelled()
                }
            },
        )
        .await;
    assert!(r.unwrap(), "the job saw no loss");
}

/// After shutdown every call fails with a typed error and the connections
/// are closed.
#[tokio::test]
async fn shutdown_closes_connections() {
    let server = RedisServer::start(&[]);
    let p = RedisProvider::connect(RedisConfig::from_url(server.url()))
        .await
        .unwrap();
    let m = module_with(p);
    m.acquire("k", owner("u")).await.unwrap();
    let mut admin = raw_connection(&server.url()).await;
    let clients = |list: String| list.lines().count();
    let before: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(clients(before) >= 2);
    m.shutdown().await;
    eventually(
        Duration::from_secs(5),
        "only the admin connection is left",
        || {
            let mut admin = admin.clone();
            async move {
                let list: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                clients(list) == 1
            }
        },
    )
    .await;
    let e = m.acquire("k2", owner("u")).await.unwrap_err();
    assert!(matches!(e, LockError::Shutdown { .. }), "{e:?}");
}

/// The module's provider accessor hands out the provider by id.
#[tokio::test]
async fn the_module_exposes_its_providers() {
    let p = redis_provider().await;
    let m = LockingModule::builder()
        .provider("locking-redis", p)
        .build()
        .unwrap();
    assert_eq!(m.default_provider_id(), "locking-redis");
    assert_eq!(m.provider(None).unwrap().identifier(), "locking-redis");
    assert_eq!(
        m.provider(Some("in-memory")).unwrap().identifier(),
        "in-memory"
    );
    assert!(m.provider(Some("x")).is_err());
}

/// Scripts and functions the server at `url` ran so far (`INFO
/// commandstats`): (EVALSHA calls, FCALL calls).
async fn script_calls(url: &str) -> (u64, u64) {
    let mut c = raw_connection(url).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    let calls = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    (calls("evalsha"), calls("fcall"))
}

/// The names of the function libraries on the server at `url`.
async fn libraries(url: &str) -> Vec<String> {
    let mut c = raw_connection(url).await;
    let list: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    list.iter()
        .filter_map(|l| match l.get("library_name") {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_scripts_run_as_one_function_library_and_come_back_after_a_flush() {
    let server = RedisServer::start(&[]);
    let url = server.url();
    let p = RedisProvider::connect(RedisConfig::from_url(&url))
        .await
        .unwrap();
    assert!(p.runs_functions());
    let m = module_with(p);
    let loaded = libraries(&url).await;
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert!(loaded[0].starts_with("lockstep_"), "{loaded:?}");
    let lease = m.acquire("k", owner("u")).await.unwrap();
    assert!(lease.release().await.unwrap());
    assert_eq!(script_calls(&url).await, (0, 2), "(EVALSHA, FCALL) calls");

    // A server that lost its functions (FUNCTION FLUSH, or a restart without
    // persistence) gets the library again on the next call.
    let mut admin = raw_connection(&url).await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(libraries(&url).await.is_empty());
    let lease = m.acquire("k", owner("u")).await.unwrap();
    assert_eq!(libraries(&url).await, loaded);
    assert!(lease.release().await.unwrap());
    assert_eq!(script_calls(&url).await.0, 0, "no EVALSHA");
}

#[tokio::test]
async fn without_functions_the_same_scripts_run_by_evalsha() {
    let server = RedisServer::start(&[]);
    let url = server.url();
    let mut admin = raw_connection(&url).await;
    // A user who may run scripts but not load or call functions, as some
    // operators set up.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "nofunctions",
            "on",
            ">pass",
            "~*",
            "&*",
            "+@all",
            "-function",
            "-fcall",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    // And one who may load functions but not call them: it finds out on
    // its first call (after loading the library), and goes on by EVALSHA.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "nofcall", "on", ">pass", "~*", "&*", "+@all", "-fcall",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let port = server.port;
    for config in [
        RedisConfig::from_url(format!("redis://nofunctions:pass@127.0.0.1:{port}")),
        RedisConfig::from_url(&url).functions(false),
        RedisConfig::from_url(format!("redis://nofcall:pass@127.0.0.1:{port}")),
    ] {
        let before = script_calls(&url).await;
        let p = RedisProvider::connect(config).await.unwrap();
        let m = module_with(p.clone());
        for key in ["k", "j"] {
            let lease = m.acquire(key, owner("u")).await.unwrap();
            assert!(lease.release().await.unwrap());
        }
        assert!(!p.runs_functions());
        let after = script_calls(&url).await;
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (4, 0),
            "(EVALSHA, FCALL) calls"
        );
    }
}

/// With the server out of memory (`maxmemory` reached, no eviction), locks
/// are still released, extended and inspected, on either way of running the
/// scripts, and a new acquisition fails with the server's error, not as a
/// key of another type.
#[tokio::test]
async fn out_of_memory_locks_still_release_and_acquisitions_fail_as_what_they_are() {
    let server = RedisServer::start(&["--maxmemory-policy", "noeviction"]);
    let url = server.url();
    let mut admin = raw_connection(&url).await;
    for functions in [true, false] {
        let p = RedisProvider::connect(RedisConfig::from_url(&url).functions(functions))
            .await
            .unwrap();
        let m = module_with(p.clone());
        let leased = || owner("u").expire(Duration::from_secs(10));
        let mut held = m.acquire("held", leased()).await.unwrap();
        let other = m.acquire("other", leased()).await.unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "maxmemory", "1"])
            .query_async(&mut admin)
            .await
            .unwrap();
        held.extend(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("functions {functions}: {e}"));
        let infos = m.inspect("other", Default::default()).await.unwrap();
        assert!(infos[0].holder().is_some(), "functions {functions}");
        assert!(held.release().await.unwrap(), "functions {functions}");
        match m.acquire("new", owner("u")).await.unwrap_err() {
            LockError::Backend(b) => {
                assert_eq!(b.kind(), BackendErrorKind::Server, "{b}");
                assert!(b.to_string().contains("OOM"), "{b}");
            }
            other => panic!("functions {functions}: {other:?}"),
        }
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "maxmemory", "0"])
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(other.release().await.unwrap());
        assert_eq!(p.runs_functions(), functions);
    }
}

/// The prelude's clock reading is per call: a function library keeps its
/// helpers' state between calls, and a clock cached from the first call
/// would stamp every later lock with that call's time.
#[tokio::test]
async fn each_function_call_reads_the_clock_afresh() {
    let p = redis_provider().await;
    let m = module_with(p);
    let first = m.acquire("first", owner("u")).await.unwrap();
    let at = |infos: Vec<lockstep::LockInfo>| infos[0].holder().unwrap().acquired_at;
    let first_at = at(m.inspect("first", Default::default()).await.unwrap());
    // The server's clock moves on (a deadline, not a bet on a sleep).
    let c = raw_connection(&shared_url()).await;
    eventually(
        Duration::from_secs(2),
        "the server's clock passed 5 ms",
        || {
            let mut c = c.clone();
            async move {
                let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
                let now = std::time::UNIX_EPOCH + Duration::from_micros(s * 1_000_000 + us);
                now.duration_since(first_at)
                    .is_ok_and(|d| d >= Duration::from_millis(5))
            }
        },
    )
    .await;
    let second = m.acquire("second", owner("u")).await.unwrap();
    let second_at = at(m.inspect("second", Default::default()).await.unwrap());
    assert!(
        second_at.duration_since(first_at).unwrap() >= Duration::from_millis(5),
        "{first_at:?} then {second_at:?}"
    );
    first.release().await.unwrap();
    second.release().await.unwrap();
}

/// `connect` dropped at every poll, on a server of its own: no connection
/// of a dropped provider stays open (its pool, or a subscription task left
/// subscribed for the life of the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connect_leaves_no_connection_behind() {
    let server = RedisServer::start(&[]);
    dropped_connects_leave_no_client(&[server.url()], || {
        RedisProvider::connect(RedisConfig::from_url(server.url()))
    })
    .await;
}
