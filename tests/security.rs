//! Credentials never leak; owner tokens are unguessable; hostile input is
//! handled (docs/failover.md's hostile-input table lists each case and what lockstep does).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{
    AcquireOptions, ConfigError, ExecuteOptions, InvalidInput, LockError, RedisConfig,
    RedisProvider,
};
use support::{RedisServer, module_with, redis_provider};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Everything traced while it is installed, as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        span.record(&mut Text(&mut self.0.lock().unwrap()));
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        values.record(&mut Text(&mut self.0.lock().unwrap()));
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        event.record(&mut Text(&mut self.0.lock().unwrap()));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// A wrong password shows up nowhere: not in the error, its Debug, its
/// sources, nor in anything lockstep traces meanwhile.
#[tokio::test]
async fn a_wrong_password_never_appears_in_errors_or_logs() {
    let capture = Capture::default();
    // Global, not thread-local: callsites that other tests of this binary
    // hit first would otherwise have cached "nobody is interested".
    tracing::subscriber::set_global_default(capture.clone())
        .expect("the only global subscriber of this binary");
    let server = RedisServer::start(&["--requirepass", "the-right-one"]);
    let url = format!("redis://user:hunter2-secret@127.0.0.1:{}", server.port);
    let e = RedisProvider::connect(RedisConfig::from_url(&url))
        .await
        .unwrap_err();
    assert!(matches!(e, ConfigError::AuthFailed { .. }), "{e:?}");
    let mut texts = vec![e.to_string(), format!("{e:?}")];
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        texts.push(s.to_string());
        source = s.source();
    }
    // Through a pool too, where the failure comes on first use.
    let pool = deadpool_redis::Config::from_url(&url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let e = RedisProvider::from_pool(pool, &RedisConfig::default())
        .await
        .unwrap_err();
    texts.push(e.to_string());
    texts.push(format!("{e:?}"));
    texts.push(format!("{:?}", RedisConfig::from_url(&url)));
    // With the right password in the URL, work is traced, and errors after
    // the server went away are reported: neither shows the password.
    let right = format!("redis://:the-right-one@127.0.0.1:{}", server.port);
    let p = RedisProvider::connect(
        RedisConfig::from_url(&right).response_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    texts.push(format!("{p:?}"));
    let m = module_with(p);
    let lease = m
        .acquire("k", AcquireOptions::new().owner_id("u"))
        .await
        .unwrap();
    drop(server);
    let e = lease.release().await.unwrap_err();
    texts.push(format!("{e} {e:?}"));
    let traced = capture.0.lock().unwrap().clone();
    assert!(traced.contains("outcome"), "spans were captured: {traced}");
    texts.push(traced);
    for t in texts {
        assert!(
            !t.contains("hunter2-secret") && !t.contains("the-right-one"),
            "a password leaked: {t}"
        );
    }
}

/// Owner tokens of `execute` come from 122 random bits (UUID v4 from the
/// OS's CSPRNG): all distinct, and not guessable from one another.
#[tokio::test]
async fn execute_owners_are_random_and_distinct() {
    let p = redis_provider().await;
    let key = p.lock_key("k");
    let m = module_with(p);
    let mut c = support::raw_connection(&support::shared_url()).await;
    let mut owners = std::collections::HashSet::new();
    for _ in 0..50 {
        let owner: String = m
            .execute("k", ExecuteOptions::new(), |_| {
                let (mut c, key) = (c.clone(), key.clone());
                async move {
                    let v = redis::cmd("GET")
                        .arg(key)
                        .query_async::<Vec<u8>>(&mut c)
                        .await
                        .unwrap();
                    // Without the 16-byte tail (lua/prelude.lua).
                    String::from_utf8(v[..v.len() - 16].to_vec()).unwrap()
                }
            })
            .await
            .unwrap();
        // execute:<32 hex digits> followed by the 12-byte nonce
        let id = &owner["execute:".len()..owner.len() - 12];
        assert_eq!(id.len(), 32);
        assert_eq!(&id[12..13], "4", "a version-4 (random) UUID: {id}");
        assert!(owners.insert(id.to_owned()));
    }
    let _: () = redis::cmd("PING").query_async(&mut c).await.unwrap();
}

/// The hostile-input table of docs/failover.md, case by case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_table() {
    let m = module_with(redis_provider().await);
    let o = |x: &str| AcquireOptions::new().owner_id(x);
    // Glob characters, newlines, non-ASCII, braces, NUL: ordinary keys, each its own lock.
    for key in [
        "*", "?", "[a-z]", "\\", "a\nb", "\r\n", "ключ", "🔒", "{x}", "}", "%7B", "a\0b",
    ] {
        let lease = m
            .acquire(key, o("u"))
            .await
            .unwrap_or_else(|e| panic!("{key:?}: {e}"));
        assert!(m.acquire(key, o("v")).await.is_err(), "{key:?} is held");
        assert!(lease.release().await.unwrap());
    }
    // Keys: empty, too long (a typed error naming the limit), at the limit.
    let e = m.acquire("", o("u")).await.unwrap_err();
    assert!(matches!(e, LockError::InvalidInput(InvalidInput::EmptyKey)));
    let e = m
        .acquire("x".repeat(lockstep::MAX_KEY_LEN + 1), o("u"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&lockstep::MAX_KEY_LEN.to_string()),
        "{e}"
    );
    m.acquire("x".repeat(lockstep::MAX_KEY_LEN), o("u"))
        .await
        .unwrap();
    // Owners: the anonymous marker of other libraries is an ordinary owner;
    // an empty owner and an overlong one are typed errors.
    for owner in ["*", "null", "None", "execute:"] {
        m.acquire("marker", o(owner)).await.unwrap();
        assert!(m.acquire("marker", AcquireOptions::new()).await.is_err());
        assert!(
            m.release("marker", lockstep::ReleaseOptions::new().owner_id(owner))
                .await
                .unwrap()
        );
    }
    assert!(matches!(
        m.acquire("k", o("")).await.unwrap_err(),
        LockError::InvalidInput(InvalidInput::EmptyOwner)
    ));
    assert!(matches!(
        m.acquire("k", o("\0abcd")).await.unwrap_err(),
        LockError::InvalidInput(InvalidInput::NulInOwner)
    ));
    assert!(matches!(
        m.acquire("k", o(&"o".repeat(lockstep::MAX_OWNER_LEN + 1)))
            .await
            .unwrap_err(),
        LockError::InvalidInput(InvalidInput::OwnerTooLong { .. })
    ));
    // Durations at the edges: 1 ms works, sub-millisecond rounds up to 1 ms,
    // zero and above the limit are typed errors.
    m.acquire("edge", o("u").expire(Duration::from_millis(1)))
        .await
        .unwrap();
    m.acquire("edge2", o("u").expire(Duration::from_nanos(1)))
        .await
        .unwrap();
    m.acquire("edge3", o("u").expire(lockstep::MAX_DURATION))
        .await
        .unwrap();
    for d in [
        Duration::ZERO,
        lockstep::MAX_DURATION + Duration::from_millis(1),
        Duration::MAX,
    ] {
        assert!(matches!(
            m.acquire("edge4", o("u").expire(d)).await.unwrap_err(),
            LockError::InvalidInput(_)
        ));
    }
    // Too many keys in one request.
    let many: Vec<String> = (0..=lockstep::MAX_KEYS).map(|i| format!("k{i}")).collect();
    assert!(matches!(
        m.acquire(many, o("u")).await.unwrap_err(),
        LockError::InvalidInput(InvalidInput::TooManyKeys { .. })
    ));
}
