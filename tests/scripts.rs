//! Each Lua script in `lua/`, called directly against a real redis-server,
//! one behaviour per test. This keeps the contract headers at the top of
//! the scripts honest, independently of the Rust wrappers.

mod support;

use std::sync::LazyLock;

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Script, Value};

const NONCE: &str = "0123456789abcdef";
const NONCE2: &str = "fedcba9876543210";

fn acquire() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/acquire.lua")));
    &S
}
fn release() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/release.lua")));
    &S
}
fn extend() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/extend.lua")));
    &S
}
fn release_all() -> &'static Script {
    static S: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("../lua/release_all.lua")));
    &S
}

/// A connection to the shared server and a key prefix of the test's own.
async fn setup() -> (MultiplexedConnection, String) {
    let conn = support::raw_connection(&support::shared_url()).await;
    (conn, support::unique_namespace())
}

/// Runs `acquire.lua` for `keys` (lock keys `ns{k}`, counter `ns{T}:f` per key).
async fn take(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    nonce: &str,
    ttl: u64,
) -> Value {
    let mut inv = acquire().prepare_invoke();
    for k in keys {
        inv.key(format!("{ns}{{{k}}}"));
    }
    for _ in keys {
        inv.key(format!("{ns}{{T}}:f"));
    }
    if !owner.is_empty() {
        inv.key(format!("{ns}{{{owner}}}:o"));
    }
    inv.arg(keys.len()).arg(owner).arg(nonce).arg(ttl);
    inv.invoke_async(c).await.expect("acquire.lua runs")
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::Int(i) => *i,
                other => panic!("not an int: {other:?}"),
            })
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

/// (status, tokens, reentered) of a successful reply.
fn granted(v: &Value) -> (Vec<i64>, Vec<i64>) {
    match v {
        Value::Array(a) if a.first() == Some(&Value::Int(1)) => (ints(&a[1]), ints(&a[2])),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn acquire_takes_every_key_with_the_lease_and_owner() {
    let (mut c, ns) = setup().await;
    let reply = take(&mut c, &ns, &["a", "b"], "u1", NONCE, 10_000).await;
    let (tokens, reentered) = granted(&reply);
    assert_eq!(tokens.len(), 2);
    assert!(tokens[1] > tokens[0], "one counter: strictly increasing");
    assert_eq!(reentered, [0, 0]);
    let v: String = c.get(format!("{ns}{{a}}")).await.unwrap();
    assert_eq!(v, format!("u1{NONCE}"));
    let pttl: i64 = c.pttl(format!("{ns}{{b}}")).await.unwrap();
    assert!((9_000..=10_000).contains(&pttl), "{pttl}");
}

#[tokio::test]
async fn acquire_without_ttl_sets_no_expiry() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "", NONCE, 0).await);
    let pttl: i64 = c.pttl(format!("{ns}{{a}}")).await.unwrap();
    assert_eq!(pttl, -1);
}

#[tokio::test]
async fn acquire_of_a_held_key_writes_nothing_and_reports_its_lease() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["b"], "u1", NONCE, 5_000).await);
    let counter_before: String = c.get(format!("{ns}{{T}}:f")).await.unwrap();
    let reply = take(&mut c, &ns, &["a", "b", "c"], "u2", NONCE2, 9_000).await;
    let r = ints(&reply);
    assert_eq!(&r[..2], [0, 2], "status 0, index of b");
    assert!((4_000..=5_000).contains(&r[2]), "pttl of b: {}", r[2]);
    let exists: i64 = c
        .exists(&[format!("{ns}{{a}}"), format!("{ns}{{c}}")])
        .await
        .unwrap();
    assert_eq!(exists, 0, "all or nothing");
    let counter_after: String = c.get(format!("{ns}{{T}}:f")).await.unwrap();
    assert_eq!(counter_before, counter_after);
    let index: i64 = c.exists(format!("{ns}{{u2}}:o")).await.unwrap();
    assert_eq!(index, 0);
}

#[tokio::test]
async fn reentry_keeps_the_lease_without_ttl_and_resets_it_with_one() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 5_000).await);
    let (_, reentered) = granted(&take(&mut c, &ns, &["a"], "u1", NONCE2, 0).await);
    assert_eq!(reentered, [1]);
    let v: String = c.get(format!("{ns}{{a}}")).await.unwrap();
    assert_eq!(v, format!("u1{NONCE}"), "re-entry keeps the first nonce");
    let pttl: i64 = c.pttl(format!("{ns}{{a}}")).await.unwrap();
    assert!((0..=5_000).contains(&pttl), "kept, not removed: {pttl}");
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE2, 60_000).await);
    let pttl: i64 = c.pttl(format!("{ns}{{a}}")).await.unwrap();
    assert!(pttl > 50_000, "reset: {pttl}");
}

#[tokio::test]
async fn anonymous_locks_are_never_reentrant() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "", NONCE, 0).await);
    let r = ints(&take(&mut c, &ns, &["a"], "", NONCE2, 0).await);
    assert_eq!(&r[..2], [0, 1]);
}

#[tokio::test]
async fn an_owner_that_is_a_prefix_of_another_is_not_the_same_owner() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "user", NONCE, 0).await);
    let r = ints(&take(&mut c, &ns, &["a"], "use", NONCE2, 0).await);
    assert_eq!(r[0], 0);
    let r = ints(&take(&mut c, &ns, &["a"], "user0123", NONCE2, 0).await);
    assert_eq!(r[0], 0);
}

#[tokio::test]
async fn acquire_refuses_a_key_of_another_type_and_writes_nothing() {
    let (mut c, ns) = setup().await;
    let _: () = c.hset(format!("{ns}{{b}}"), "f", "v").await.unwrap();
    let reply = take(&mut c, &ns, &["a", "b"], "u1", NONCE, 0).await;
    assert_eq!(ints(&reply), [2, 2]);
    let exists: i64 = c.exists(format!("{ns}{{a}}")).await.unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn tokens_never_go_back_when_the_counter_is_ahead_or_lost() {
    let (mut c, ns) = setup().await;
    let counter = format!("{ns}{{T}}:f");
    // Ahead of the clock (a burst, or a clock that stepped back): +1.
    let _: () = c.set(&counter, "9000000000000000").await.unwrap();
    let (t, _) = granted(&take(&mut c, &ns, &["a"], "", NONCE, 0).await);
    assert_eq!(t, [9_000_000_000_000_001]);
    // Lost (restart without persistence): the time floor, still above any
    // token the old counter gave out at clock speed.
    let _: () = c.del(&counter).await.unwrap();
    let _: () = c.del(format!("{ns}{{a}}")).await.unwrap();
    let (t, _) = granted(&take(&mut c, &ns, &["a"], "", NONCE, 0).await);
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let now_us = (secs * 1_000_000 + micros) as i64;
    assert!(
        t[0] <= now_us && t[0] > now_us - 60_000_000,
        "{} vs {now_us}",
        t[0]
    );
}

#[tokio::test]
async fn the_owner_index_lives_exactly_as_long_as_its_longest_lock() {
    let (mut c, ns) = setup().await;
    let index = format!("{ns}{{u1}}:o");
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 2_000).await);
    granted(&take(&mut c, &ns, &["b"], "u1", NONCE, 8_000).await);
    let members: Vec<String> = c.zrange(&index, 0, -1).await.unwrap();
    assert_eq!(members, [format!("{ns}{{a}}"), format!("{ns}{{b}}")]);
    let pttl: i64 = c.pttl(&index).await.unwrap();
    assert!((7_000..=8_000).contains(&pttl), "{pttl}");
    granted(&take(&mut c, &ns, &["c"], "u1", NONCE, 0).await);
    let pttl: i64 = c.pttl(&index).await.unwrap();
    assert_eq!(pttl, -1, "a lock without expiry keeps the index");
    let score: String = redis::cmd("ZSCORE")
        .arg(&index)
        .arg(format!("{ns}{{c}}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(score, "inf");
}

#[tokio::test]
async fn acquire_prunes_index_entries_of_expired_locks() {
    let (mut c, ns) = setup().await;
    let index = format!("{ns}{{u1}}:o");
    granted(&take(&mut c, &ns, &["short"], "u1", NONCE, 30).await);
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    granted(&take(&mut c, &ns, &["long"], "u1", NONCE, 10_000).await);
    let members: Vec<String> = c.zrange(&index, 0, -1).await.unwrap();
    assert_eq!(members, [format!("{ns}{{long}}")]);
}

/// Invokes `script` the way release.lua and extend.lua expect: the lock
/// keys, the owner's index for a named owner, then `n`, the owner and `last`.
async fn call<T: redis::FromRedisValue>(
    script: &Script,
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    last: &str,
) -> T {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(format!("{ns}{{{k}}}"));
    }
    if !owner.is_empty() {
        inv.key(format!("{ns}{{{owner}}}:o"));
    }
    inv.arg(keys.len()).arg(owner).arg(last);
    inv.invoke_async(c).await.expect("the script runs")
}

/// release.lua
async fn free(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    nonce: &str,
) -> Vec<i64> {
    call(release(), c, ns, keys, owner, nonce).await
}

#[tokio::test]
async fn release_frees_only_the_owners_keys_and_reports_each() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a", "b"], "u1", NONCE, 0).await);
    granted(&take(&mut c, &ns, &["c"], "u2", NONCE, 0).await);
    assert_eq!(
        free(&mut c, &ns, &["a", "c", "missing"], "u1", "").await,
        [1, 0, 0]
    );
    let v: String = c.get(format!("{ns}{{c}}")).await.unwrap();
    assert_eq!(v, format!("u2{NONCE}"), "untouched");
    let members: Vec<String> = c.zrange(format!("{ns}{{u1}}:o"), 0, -1).await.unwrap();
    assert_eq!(members, [format!("{ns}{{b}}")]);
}

#[tokio::test]
async fn release_without_owner_frees_only_anonymous_locks() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["named"], "u1", NONCE, 0).await);
    granted(&take(&mut c, &ns, &["anon"], "", NONCE, 0).await);
    assert_eq!(free(&mut c, &ns, &["named", "anon"], "", "").await, [0, 1]);
}

#[tokio::test]
async fn release_with_a_nonce_frees_only_that_acquisition() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["old"], "u1", NONCE, 0).await);
    // A second acquisition by the same owner re-enters "old" and takes "new".
    granted(&take(&mut c, &ns, &["old", "new"], "u1", NONCE2, 0).await);
    assert_eq!(
        free(&mut c, &ns, &["old", "new"], "u1", NONCE2).await,
        [0, 1]
    );
    let v: String = c.get(format!("{ns}{{old}}")).await.unwrap();
    assert_eq!(
        v,
        format!("u1{NONCE}"),
        "the earlier hold survives the undo"
    );
}

#[tokio::test]
async fn release_of_a_key_of_another_type_reports_zero() {
    let (mut c, ns) = setup().await;
    let _: () = c.rpush(format!("{ns}{{l}}"), "x").await.unwrap();
    assert_eq!(free(&mut c, &ns, &["l"], "", "").await, [0]);
    let len: i64 = c.llen(format!("{ns}{{l}}")).await.unwrap();
    assert_eq!(len, 1);
}

/// extend.lua
async fn prolong(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    ttl: u64,
) -> i64 {
    call(extend(), c, ns, keys, owner, &ttl.to_string()).await
}

#[tokio::test]
async fn extend_is_all_or_nothing() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 1_000).await);
    granted(&take(&mut c, &ns, &["b"], "u2", NONCE, 1_000).await);
    assert_eq!(prolong(&mut c, &ns, &["a", "b"], "u1", 60_000).await, 2);
    let pttl: i64 = c.pttl(format!("{ns}{{a}}")).await.unwrap();
    assert!(pttl <= 1_000, "unchanged: {pttl}");
    assert_eq!(prolong(&mut c, &ns, &["a"], "u1", 60_000).await, 0);
    let pttl: i64 = c.pttl(format!("{ns}{{a}}")).await.unwrap();
    assert!(pttl > 50_000, "{pttl}");
    let index_ttl: i64 = c.pttl(format!("{ns}{{u1}}:o")).await.unwrap();
    assert!(index_ttl > 50_000, "the index follows: {index_ttl}");
    assert_eq!(prolong(&mut c, &ns, &["missing"], "u1", 1_000).await, 1);
}

#[tokio::test]
async fn extend_gives_a_permanent_lock_a_lease() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 0).await);
    assert_eq!(prolong(&mut c, &ns, &["a"], "u1", 5_000).await, 0);
    let pttl: i64 = c.pttl(format!("{ns}{{a}}")).await.unwrap();
    assert!((0..=5_000).contains(&pttl));
    let index_ttl: i64 = c.pttl(format!("{ns}{{u1}}:o")).await.unwrap();
    assert!(
        (0..=5_000).contains(&index_ttl),
        "no longer permanent: {index_ttl}"
    );
}

#[tokio::test]
async fn release_all_with_an_owner_visits_only_its_index() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a", "b"], "u1", NONCE, 0).await);
    granted(&take(&mut c, &ns, &["c"], "u2", NONCE, 0).await);
    let n: i64 = release_all()
        .key(format!("{ns}{{u1}}:o"))
        .arg("owner")
        .arg("u1")
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left: i64 = c
        .exists(&[
            format!("{ns}{{a}}"),
            format!("{ns}{{b}}"),
            format!("{ns}{{u1}}:o"),
        ])
        .await
        .unwrap();
    assert_eq!(left, 0);
    let c_val: String = c.get(format!("{ns}{{c}}")).await.unwrap();
    assert_eq!(c_val, format!("u2{NONCE}"));
}

#[tokio::test]
async fn release_all_of_a_namespace_keeps_counters_and_other_namespaces() {
    let (mut c, ns) = setup().await;
    let other = support::unique_namespace();
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 0).await);
    granted(&take(&mut c, &ns, &["b"], "", NONCE, 5_000).await);
    granted(&take(&mut c, &other, &["a"], "u1", NONCE, 0).await);
    // A namespace full of glob characters must match only itself.
    let globby = format!("{}*?[x]:", ns.trim_end_matches(':'));
    granted(&take(&mut c, &globby, &["g"], "", NONCE, 0).await);
    let n: i64 = release_all()
        .arg("namespace")
        .arg(&globby)
        .arg(format!(
            "{}*",
            globby
                .replace('*', "\\*")
                .replace('?', "\\?")
                .replace('[', "\\[")
                .replace(']', "\\]")
        ))
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n: i64 = release_all()
        .arg("namespace")
        .arg(&ns)
        .arg(format!("{ns}*"))
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left: Vec<String> = c.keys(format!("{ns}*")).await.unwrap();
    assert_eq!(left, [format!("{ns}{{T}}:f")], "only the counter stays");
    let other_lock: i64 = c.exists(format!("{other}{{a}}")).await.unwrap();
    assert_eq!(other_lock, 1);
}

/// After `SCRIPT FLUSH` (or a restart), `EVALSHA` answers NOSCRIPT and the
/// invocation loads the script and retries, for every script.
#[tokio::test]
async fn every_script_works_after_script_flush() {
    let server = support::RedisServer::start(&[]);
    let mut c = support::raw_connection(&server.url()).await;
    let ns = "flush:";
    granted(&take(&mut c, ns, &["a"], "u1", NONCE, 0).await);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let hashes: Vec<String> = [acquire(), release(), extend(), release_all()]
        .iter()
        .map(|s| s.get_hash().to_owned())
        .collect();
    let loaded: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&hashes)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        loaded, [false; 4],
        "the flush really emptied the script cache"
    );
    granted(&take(&mut c, ns, &["b"], "u1", NONCE, 0).await);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(prolong(&mut c, ns, &["a", "b"], "u1", 5_000).await, 0);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(free(&mut c, ns, &["a"], "u1", "").await, [1]);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let n: i64 = release_all()
        .key(format!("{ns}{{u1}}:o"))
        .arg("owner")
        .arg("u1")
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
}
