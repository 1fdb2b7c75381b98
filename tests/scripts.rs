//! Each Lua script in `lua/`, called directly against a real redis-server,
//! one behaviour per test. This keeps the contract headers at the top of
//! the scripts honest, independently of the Rust wrappers.

mod support;

use std::sync::LazyLock;

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Script, Value};

const NONCE: &str = "0123456789ab";
const NONCE2: &str = "ba9876543210";

/// What lockstep loads: prelude.lua, then the script.
macro_rules! with_prelude {
    ($file:literal) => {
        concat!(
            include_str!("../lua/prelude.lua"),
            "\n",
            include_str!($file)
        )
    };
}

fn acquire() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(with_prelude!("../lua/acquire.lua")));
    &S
}
fn release() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(with_prelude!("../lua/release.lua")));
    &S
}
fn withdraw() -> &'static Script {
    static S: LazyLock<Script> =
        LazyLock::new(|| Script::new(with_prelude!("../lua/withdraw.lua")));
    &S
}

fn extend() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(with_prelude!("../lua/extend.lua")));
    &S
}
fn inspect() -> &'static Script {
    static S: LazyLock<Script> = LazyLock::new(|| Script::new(with_prelude!("../lua/inspect.lua")));
    &S
}
fn release_all() -> &'static Script {
    static S: LazyLock<Script> =
        LazyLock::new(|| Script::new(with_prelude!("../lua/release_all.lua")));
    &S
}

/// A connection to the shared server and a key prefix of the test's own.
async fn setup() -> (MultiplexedConnection, String) {
    let conn = support::raw_connection(&support::shared_url()).await;
    (conn, support::unique_namespace())
}

/// How an acquire call queues (acquire.lua's ARGV[5..9]).
#[derive(Clone, Copy)]
struct Q<'a> {
    pid: &'a str,
    entry: &'a str,
    more: bool,
    /// ARGV[9]: leave re-entered leases alone.
    keep_reentered: bool,
    /// ARGV[11]: the holder's metadata.
    metadata: &'a str,
}

const NO_QUEUE: Q<'static> = Q {
    pid: "",
    entry: "",
    more: false,
    keep_reentered: false,
    metadata: "",
};

/// The nonce an acquisition with lease `ttl` sends: one without expiry
/// starts with '.' (see prelude.lua).
fn nonce_for(nonce: &str, ttl: u64) -> String {
    if ttl == 0 {
        format!(".{}", &nonce[1..])
    } else {
        nonce.to_owned()
    }
}

/// The KEYS of acquire.lua: locks, counters (one shared `ns{T}:f` here),
/// queues, and both parts of the owner's index for a named owner.
fn request_keys(inv: &mut redis::ScriptInvocation<'_>, ns: &str, keys: &[&str], owner: &str) {
    lock_keys(inv, ns, keys);
    if !owner.is_empty() {
        inv.key(format!("{ns}{{{owner}}}:o"));
        inv.key(format!("{ns}{{{owner}}}:p"));
    }
}

/// Locks, counters and queues: the KEYS both acquire.lua and release.lua
/// start with.
fn lock_keys(inv: &mut redis::ScriptInvocation<'_>, ns: &str, keys: &[&str]) {
    for k in keys {
        inv.key(format!("{ns}{{{k}}}"));
    }
    for _ in keys {
        inv.key(format!("{ns}{{T}}:f"));
    }
    for k in keys {
        inv.key(format!("{ns}{{{k}}}:q"));
    }
}

/// Reservations last this long in these tests.
const CLAIM_MS: u64 = 2_000;

/// Runs `acquire.lua` for `keys` (lock keys `ns{k}`, counter `ns{T}:f` per key).
async fn take(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    nonce: &str,
    ttl: u64,
) -> Value {
    take_q(c, ns, keys, owner, nonce, ttl, NO_QUEUE).await
}

#[allow(clippy::too_many_arguments)]
async fn take_q(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    nonce: &str,
    ttl: u64,
    q: Q<'_>,
) -> Value {
    let mut inv = acquire().prepare_invoke();
    request_keys(&mut inv, ns, keys, owner);
    inv.arg(keys.len())
        .arg(owner)
        .arg(nonce_for(nonce, ttl))
        .arg(ttl);
    inv.arg(q.pid).arg(q.entry).arg(10_000);
    inv.arg(if q.more { "1" } else { "0" })
        .arg(if q.keep_reentered { "1" } else { "0" })
        .arg("0")
        .arg(q.metadata);
    inv.invoke_async(c).await.expect("acquire.lua runs")
}

/// Ends the lease of lock `key` now, as if it had run out (an expiry in
/// the past deletes the key at once): no sleeping until it lapses.
async fn lapse(c: &mut MultiplexedConnection, ns: &str, key: &str) {
    let gone: bool = c.pexpire_at(format!("{ns}{{{key}}}"), 1).await.unwrap();
    assert!(gone, "{key} was not held");
}

/// The remaining lease of lock `key`, in ms (-1: none, -2: not held).
async fn lease_ms(c: &mut MultiplexedConnection, ns: &str, key: &str) -> i64 {
    c.pttl(format!("{ns}{{{key}}}")).await.unwrap()
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
        // One free lock: its token alone.
        Value::Int(token) if *token > 0 => (vec![*token], vec![0]),
        Value::Array(a) if a.first() == Some(&Value::Int(1)) => (ints(&a[1]), ints(&a[2])),
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// The uncontended single lock, the common case, is answered with its
/// token alone (one integer to parse); a re-entry with the full reply.
#[tokio::test]
async fn a_free_single_lock_is_answered_with_its_token_alone() {
    let (mut c, ns) = setup().await;
    let reply = take(&mut c, &ns, &["a"], "u1", NONCE, 10_000).await;
    assert!(matches!(reply, Value::Int(t) if t > 0), "{reply:?}");
    let reply = take(&mut c, &ns, &["a"], "u1", NONCE2, 10_000).await;
    assert!(
        matches!(&reply, Value::Array(a) if a.len() == 3),
        "{reply:?}"
    );
    assert_eq!(granted(&reply).1, [1], "re-entered");
}

#[tokio::test]
async fn acquire_takes_every_key_with_the_lease_and_owner() {
    let (mut c, ns) = setup().await;
    let reply = take(&mut c, &ns, &["a", "b"], "u1", NONCE, 10_000).await;
    let (tokens, reentered) = granted(&reply);
    assert_eq!(tokens.len(), 2);
    assert!(tokens[1] > tokens[0], "one counter: strictly increasing");
    assert_eq!(reentered, [0, 0]);
    let v = value_of(&mut c, &ns, "a").await.unwrap();
    assert_eq!(v, format!("u1{NONCE}"));
    let pttl = lease_ms(&mut c, &ns, "b").await;
    assert!((9_000..=10_000).contains(&pttl), "{pttl}");
}

#[tokio::test]
async fn acquire_without_ttl_sets_no_expiry() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "", NONCE, 0).await);
    let pttl = lease_ms(&mut c, &ns, "a").await;
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

/// ARGV[12] (a cluster request over several slots): a re-entered lock keeps
/// its lease even with a ttl, and its index entry says so; new locks get
/// the ttl.
#[tokio::test]
async fn reentry_can_be_told_to_keep_the_lease() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 60_000).await);
    let keep = Q {
        keep_reentered: true,
        ..NO_QUEUE
    };
    let (_, reentered) =
        granted(&take_q(&mut c, &ns, &["a", "b"], "u1", NONCE2, 1_000, keep).await);
    assert_eq!(reentered, [1, 0]);
    let a = lease_ms(&mut c, &ns, "a").await;
    let b = lease_ms(&mut c, &ns, "b").await;
    assert!(a > 50_000, "kept: {a}");
    assert!((1..=1_000).contains(&b), "{b}");
    let index_ttl: i64 = c.pttl(format!("{ns}{{u1}}:o")).await.unwrap();
    assert!(
        index_ttl > 50_000,
        "the index keeps the long lease: {index_ttl}"
    );
}

#[tokio::test]
async fn reentry_keeps_the_lease_without_ttl_and_resets_it_with_one() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 5_000).await);
    let (_, reentered) = granted(&take(&mut c, &ns, &["a"], "u1", NONCE2, 0).await);
    assert_eq!(reentered, [1]);
    let v = value_of(&mut c, &ns, "a").await.unwrap();
    assert_eq!(
        v,
        format!("u1{}", shared(NONCE)),
        "re-entry marks the nonce"
    );
    let pttl = lease_ms(&mut c, &ns, "a").await;
    assert!((0..=5_000).contains(&pttl), "kept, not removed: {pttl}");
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE2, 60_000).await);
    let pttl = lease_ms(&mut c, &ns, "a").await;
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

/// A held lock whose queue key holds another type: the waiter cannot queue,
/// is told which key it is (KEYS[2n+i]), and nothing is written: the lock
/// stays unflagged, the foreign key untouched.
#[tokio::test]
async fn a_queue_of_another_type_is_reported_and_nothing_is_written() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 10_000).await);
    let lock = format!("{ns}{{a}}");
    let before: Vec<u8> = c.get(&lock).await.unwrap();
    let _: () = c.set(format!("{ns}{{a}}:q"), "not a list").await.unwrap();
    let queued = Q {
        pid: "p2",
        entry: "p2",
        ..NO_QUEUE
    };
    let reply = take_q(&mut c, &ns, &["a"], "u2", NONCE2, 10_000, queued).await;
    assert_eq!(ints(&reply), [2, 3]);
    let after: Vec<u8> = c.get(&lock).await.unwrap();
    assert_eq!(after, before, "the lock was not flagged");
    let q: String = c.get(format!("{ns}{{a}}:q")).await.unwrap();
    assert_eq!(q, "not a list");
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

/// ARGV[10], the caller's clock floor: a counter behind it (stale, as on a
/// promoted replica that missed increments) jumps to it; one at or above
/// it is only incremented.
#[tokio::test]
async fn a_counter_behind_the_floor_jumps_to_it_and_is_incremented_after() {
    let (mut c, ns) = setup().await;
    let counter = format!("{ns}{{T}}:f");
    let _: () = c.set(&counter, "5").await.unwrap();
    let take_floored = |key: &'static str, floor: u64| {
        let mut inv = acquire().prepare_invoke();
        request_keys(&mut inv, &ns, &[key], "");
        inv.arg(1).arg("").arg(NONCE).arg(10_000);
        inv.arg("").arg("").arg(10_000);
        inv.arg("0").arg("0").arg(floor);
        inv
    };
    let floor = 1_700_000_000_000_000u64;
    let (t, _) = granted(&take_floored("a", floor).invoke_async(&mut c).await.unwrap());
    assert_eq!(t, [floor as i64]);
    let (t, _) = granted(&take_floored("b", floor).invoke_async(&mut c).await.unwrap());
    assert_eq!(t, [floor as i64 + 1], "at the floor: a plain INCR");
    let (t, _) = granted(
        &take_floored("c", floor - 1_000)
            .invoke_async(&mut c)
            .await
            .unwrap(),
    );
    assert_eq!(
        t,
        [floor as i64 + 2],
        "a floor behind the counter changes nothing"
    );
}

/// Asserts that `owner`'s expiring index outlives a lock whose lease of
/// `ttl` ms began (about) now by less than its step (an eighth of the
/// lease in whole seconds, at least one; see `index_score` in prelude.lua).
async fn assert_index_lives_past(c: &mut MultiplexedConnection, ns: &str, owner: &str, ttl: i64) {
    let step = (ttl / 8_000).max(1) * 1_000;
    let pttl: i64 = c.pttl(format!("{ns}{{{owner}}}:o")).await.unwrap();
    assert!(
        (ttl - 1_000..=ttl + step).contains(&pttl),
        "the index of {owner} expires in {pttl} ms, the lock in {ttl}"
    );
}

#[tokio::test]
async fn the_owner_index_outlives_its_longest_lock_by_less_than_a_step() {
    let (mut c, ns) = setup().await;
    let index = format!("{ns}{{u1}}:o");
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 2_000).await);
    granted(&take(&mut c, &ns, &["b"], "u1", NONCE, 8_000).await);
    let members: Vec<String> = c.zrange(&index, 0, -1).await.unwrap();
    assert_eq!(members, [format!("{ns}{{a}}"), format!("{ns}{{b}}")]);
    assert_index_lives_past(&mut c, &ns, "u1", 8_000).await;
    // Each entry's score (seconds) is past its lock's end, by the server's
    // clock.
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let now_ms = secs * 1_000 + micros / 1_000;
    for k in ["a", "b"] {
        let score: f64 = c.zscore(&index, format!("{ns}{{{k}}}")).await.unwrap();
        let end = now_ms + lease_ms(&mut c, &ns, k).await;
        assert!(
            score as i64 * 1_000 >= end,
            "{k}: score {score}, lease ends {end}"
        );
    }
    // A lock without expiry goes to the permanent part; the expiring part
    // keeps its lease.
    granted(&take(&mut c, &ns, &["c"], "u1", NONCE, 0).await);
    assert_index_lives_past(&mut c, &ns, "u1", 8_000).await;
    let permanent = format!("{ns}{{u1}}:p");
    let members: Vec<String> = c.zrange(&permanent, 0, -1).await.unwrap();
    assert_eq!(members, [format!("{ns}{{c}}")]);
    assert_eq!(c.pttl::<_, i64>(&permanent).await.unwrap(), -1);
}

/// Taking a key again within its entry's step leaves the index alone: its
/// expiry is not written on every acquisition (the cost the score saves).
#[tokio::test]
async fn retaking_a_key_within_its_step_does_not_touch_the_index() {
    let (mut c, ns) = setup().await;
    let index = format!("{ns}{{u1}}:o");
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 60_000).await);
    assert_index_lives_past(&mut c, &ns, "u1", 60_000).await;
    let a = format!("{ns}{{a}}");
    // Up to 3 tries: the second take may fall into the next step (7 s
    // wide here), when the index is rightly written again.
    for attempt in 1.. {
        let before: f64 = c.zscore(&index, &a).await.unwrap();
        // Shorten the index's life behind the script's back: a script
        // that wrote the expiry again would lift it back.
        let _: bool = c.pexpire(&index, 30_000).await.unwrap();
        assert_eq!(free(&mut c, &ns, &["a"], "u1", "").await, [1]);
        granted(&take(&mut c, &ns, &["a"], "u1", NONCE2, 60_000).await);
        let after: f64 = c.zscore(&index, &a).await.unwrap();
        if after != before && attempt < 3 {
            continue;
        }
        let pttl: i64 = c.pttl(&index).await.unwrap();
        assert!(pttl <= 30_000, "the index was written again: {pttl}");
        break;
    }
    // A lease that reaches into a later step raises it.
    granted(&take(&mut c, &ns, &["b"], "u1", NONCE, 600_000).await);
    assert_index_lives_past(&mut c, &ns, "u1", 600_000).await;
}

/// An owner that keeps one long lock and goes on taking short ones: the
/// entries of the expired ones are trimmed as it goes (one new entry in 16
/// samples 8), and its live locks stay indexed.
#[tokio::test]
async fn acquire_trims_index_entries_of_expired_locks() {
    let (mut c, ns) = setup().await;
    let index = format!("{ns}{{u1}}:o");
    granted(&take(&mut c, &ns, &["long"], "u1", NONCE, 60_000).await);
    for i in 0..64 {
        let key = format!("short{i}");
        granted(&take(&mut c, &ns, &[&key], "u1", NONCE, 60_000).await);
        lapse(&mut c, &ns, &key).await;
    }
    for i in 0..64 {
        granted(&take(&mut c, &ns, &[&format!("next{i}")], "u1", NONCE, 60_000).await);
    }
    let members: Vec<String> = c.zrange(&index, 0, -1).await.unwrap();
    assert!(members.len() < 129, "nothing trimmed: {}", members.len());
    for k in std::iter::once("long".to_owned()).chain((0..64).map(|i| format!("next{i}"))) {
        assert!(
            members.contains(&format!("{ns}{{{k}}}")),
            "{k} left the index"
        );
    }
}

/// Invokes extend.lua: the lock keys, the owner's index for a named owner,
/// then `n`, the owner and the lease.
async fn prolong(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    ttl: u64,
) -> i64 {
    let mut inv = extend().prepare_invoke();
    for k in keys {
        inv.key(format!("{ns}{{{k}}}"));
    }
    if !owner.is_empty() {
        inv.key(format!("{ns}{{{owner}}}:o"));
        inv.key(format!("{ns}{{{owner}}}:p"));
    }
    inv.arg(keys.len()).arg(owner).arg(ttl);
    inv.invoke_async(c).await.expect("extend.lua runs")
}

/// A successor for release.lua: a local waiter of process `pid`.
struct Succ<'a> {
    owner: &'a str,
    nonce: &'a str,
    ttl: u64,
    pid: &'a str,
    more: bool,
    metadata: &'a str,
}

/// Invokes release.lua; returns {released_1..released_n, successor_token}.
async fn free_full(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    nonce: &str,
    succ: Option<Succ<'_>>,
) -> Vec<i64> {
    let metadata = succ.as_ref().map_or("", |s| s.metadata);
    let mut inv = release().prepare_invoke();
    lock_keys(&mut inv, ns, keys);
    if !owner.is_empty() {
        inv.key(format!("{ns}{{{owner}}}:p"));
    }
    inv.arg(keys.len())
        .arg(owner)
        .arg(nonce)
        .arg(CLAIM_MS)
        .arg(format!("{ns}c:"));
    inv.arg(if owner.is_empty() { "0" } else { "1" });
    // Without a successor ARGV[7..14] are left out, as lockstep sends them.
    if let Some(s) = succ {
        inv.arg(s.owner)
            .arg(s.nonce)
            .arg(s.ttl)
            .arg("0")
            .arg(s.pid)
            .arg(if s.more { "1" } else { "0" })
            .arg(10_000)
            .arg(metadata);
    }
    match inv.invoke_async(c).await.expect("release.lua runs") {
        // One key, not handed on: 1 if released, 0 if not.
        Value::Int(released) if keys.len() == 1 => vec![released, 0],
        other => ints(&other),
    }
}

/// release.lua without a successor: per key, 1 if released.
async fn free(
    c: &mut MultiplexedConnection,
    ns: &str,
    keys: &[&str],
    owner: &str,
    nonce: &str,
) -> Vec<i64> {
    let mut r = free_full(c, ns, keys, owner, nonce, None).await;
    assert_eq!(r.pop(), Some(0), "no successor, no token");
    r
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
    let v = value_of(&mut c, &ns, "c").await.unwrap();
    assert_eq!(v, format!("u2{}", nonce_for(NONCE, 0)), "untouched");
    // Locks without expiry are indexed in the permanent part, and leave it.
    let members: Vec<String> = c.zrange(format!("{ns}{{u1}}:p"), 0, -1).await.unwrap();
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
        free(&mut c, &ns, &["old", "new"], "u1", &nonce_for(NONCE2, 0)).await,
        [0, 1]
    );
    let v = value_of(&mut c, &ns, "old").await.unwrap();
    assert_eq!(
        v,
        format!("u1{}", shared(&nonce_for(NONCE, 0))),
        "the earlier hold survives the undo"
    );
}

/// A nonce as a re-entry leaves it (see `shared_core` in prelude.lua).
fn shared(nonce: &str) -> String {
    format!("{}!{}", &nonce[..1], &nonce[2..])
}

#[tokio::test]
async fn an_undo_of_the_first_acquisition_leaves_a_lock_re_entered_since() {
    // The first acquisition's reply was lost (its caller undoes it by its
    // nonce) while a second call of the same owner re-entered the lock and
    // was told it holds it: the undo must not free it under that call.
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["k"], "u1", NONCE, 60_000).await);
    let (_, reentered) = granted(&take(&mut c, &ns, &["k"], "u1", NONCE2, 60_000).await);
    assert_eq!(reentered, [1]);
    assert_eq!(free(&mut c, &ns, &["k"], "u1", NONCE).await, [0]);
    assert_eq!(
        value_of(&mut c, &ns, "k").await.unwrap(),
        format!("u1{}", shared(NONCE)),
        "still held by the owner"
    );
    // A retry of the first acquisition finds it held by its owner.
    let (_, reentered) = granted(&take(&mut c, &ns, &["k"], "u1", NONCE, 60_000).await);
    assert_eq!(reentered, [1]);
    // The owner's release frees it.
    assert_eq!(free(&mut c, &ns, &["k"], "u1", "").await, [1]);
    assert_eq!(value_of(&mut c, &ns, "k").await, None);
}

#[tokio::test]
async fn release_of_a_key_of_another_type_reports_zero() {
    let (mut c, ns) = setup().await;
    let _: () = c.rpush(format!("{ns}{{l}}"), "x").await.unwrap();
    assert_eq!(free(&mut c, &ns, &["l"], "", "").await, [0]);
    let len: i64 = c.llen(format!("{ns}{{l}}")).await.unwrap();
    assert_eq!(len, 1);
}

/// release.lua: a lock without expiry leaves the permanent part of its
/// owner's index when released, so nothing of the owner outlives its locks
/// with a lease.
#[tokio::test]
async fn releasing_the_permanent_lock_lets_the_index_expire() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["forever"], "run-1", NONCE, 0).await);
    granted(&take(&mut c, &ns, &["brief"], "run-1", NONCE2, 5_000).await);
    let permanent = format!("{ns}{{run-1}}:p");
    assert_eq!(c.pttl::<_, i64>(&permanent).await.unwrap(), -1);
    assert_eq!(free(&mut c, &ns, &["forever"], "run-1", "").await, [1]);
    assert!(!c.exists::<_, bool>(&permanent).await.unwrap(), "emptied");
    assert_index_lives_past(&mut c, &ns, "run-1", 5_000).await;
}

/// extend.lua updates an owner index's entries but never creates one: an
/// owner the acquisition did not index stays unindexed.
#[tokio::test]
async fn extend_does_not_index_an_unindexed_owner() {
    let (mut c, ns) = setup().await;
    // Taken without the index key (an execute owner).
    let mut inv = acquire().prepare_invoke();
    request_keys(&mut inv, &ns, &["k"], "");
    inv.arg(1).arg("execute:x").arg(NONCE).arg(1_000);
    inv.arg("").arg("").arg(10_000);
    inv.arg("0").arg("0").arg("0");
    granted(&inv.invoke_async::<Value>(&mut c).await.unwrap());
    assert_eq!(prolong(&mut c, &ns, &["k"], "execute:x", 5_000).await, 0);
    let index: bool = c.exists(format!("{ns}{{execute:x}}:o")).await.unwrap();
    assert!(!index, "extend created an index");
    assert!(lease_ms(&mut c, &ns, "k").await > 4_000);
}

#[tokio::test]
async fn extend_is_all_or_nothing() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a"], "u1", NONCE, 1_000).await);
    granted(&take(&mut c, &ns, &["b"], "u2", NONCE, 1_000).await);
    assert_eq!(prolong(&mut c, &ns, &["a", "b"], "u1", 60_000).await, 2);
    let pttl = lease_ms(&mut c, &ns, "a").await;
    assert!(pttl <= 1_000, "unchanged: {pttl}");
    assert_eq!(prolong(&mut c, &ns, &["a"], "u1", 60_000).await, 0);
    let pttl = lease_ms(&mut c, &ns, "a").await;
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
    let pttl = lease_ms(&mut c, &ns, "a").await;
    assert!((0..=5_000).contains(&pttl));
    // No longer permanent: in the expiring part, which follows its lease.
    assert_index_lives_past(&mut c, &ns, "u1", 5_000).await;
}

#[tokio::test]
async fn release_all_with_an_owner_visits_only_its_index() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["a", "b"], "u1", NONCE, 0).await);
    granted(&take(&mut c, &ns, &["c"], "u2", NONCE, 0).await);
    let n: i64 = release_all()
        .key(format!("{ns}{{u1}}:o"))
        .key(format!("{ns}{{u1}}:p"))
        .arg("owner")
        .arg("u1")
        .arg(CLAIM_MS)
        .arg(format!("{ns}c:"))
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left: i64 = c
        .exists(&[
            format!("{ns}{{a}}"),
            format!("{ns}{{b}}"),
            format!("{ns}{{u1}}:o"),
            format!("{ns}{{u1}}:p"),
        ])
        .await
        .unwrap();
    assert_eq!(left, 0);
    let c_val = value_of(&mut c, &ns, "c").await.unwrap();
    assert_eq!(c_val, format!("u2{}", nonce_for(NONCE, 0)));
}

/// release_all.lua, namespace mode: a lock only reserved for a waiting
/// process (`"\0<pid>"`) is cleared but not counted as a released lock.
#[tokio::test]
async fn release_all_does_not_count_reservations() {
    let (mut c, ns) = setup().await;
    let _: () = c
        .set(format!("{ns}{{k}}"), "\0somepid0000000000")
        .await
        .unwrap();
    granted(&take(&mut c, &ns, &["held"], "u1", NONCE, 0).await);
    let n: i64 = release_all()
        .arg("namespace")
        .arg(&ns)
        .arg(format!("{ns}*"))
        .arg("")
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "the reservation counted as a lock");
    assert!(!c.exists::<_, bool>(format!("{ns}{{k}}")).await.unwrap());
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
        .arg(format!("{globby}c:"))
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n: i64 = release_all()
        .arg("namespace")
        .arg(&ns)
        .arg(format!("{ns}*"))
        .arg(format!("{ns}c:"))
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
        .key(format!("{ns}{{u1}}:p"))
        .arg("owner")
        .arg("u1")
        .arg(CLAIM_MS)
        .arg(format!("{ns}c:"))
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

// ---- The waiting protocol: queues, reservations, handoffs (prelude.lua) ----

/// A process that listens on its channel, as a provider's subscription does.
struct Listener {
    stream: redis::aio::PubSubStream,
    _sink: redis::aio::PubSubSink,
}

impl Listener {
    async fn new(ns: &str, pid: &str) -> Listener {
        let client = redis::Client::open(support::shared_url()).unwrap();
        let (mut sink, stream) = client.get_async_pubsub().await.unwrap().split();
        sink.subscribe(format!("{ns}c:{pid}")).await.unwrap();
        Listener {
            stream,
            _sink: sink,
        }
    }

    /// The next message, within a second.
    async fn next(&mut self) -> String {
        use futures_util::StreamExt;
        let msg = tokio::time::timeout(std::time::Duration::from_secs(1), self.stream.next())
            .await
            .expect("a message within a second")
            .expect("the subscription is open");
        String::from_utf8(msg.get_payload_bytes().to_vec()).unwrap()
    }
}

async fn queue_of(c: &mut MultiplexedConnection, ns: &str, key: &str) -> Vec<String> {
    c.lrange(format!("{ns}{{{key}}}:q"), 0, -1).await.unwrap()
}

/// Lock `key`'s value without its tail (prelude.lua): the core, and the
/// contended flag if set; reservations as they are.
async fn value_of(c: &mut MultiplexedConnection, ns: &str, key: &str) -> Option<String> {
    let raw: Option<Vec<u8>> = c.get(format!("{ns}{{{key}}}")).await.unwrap();
    raw.map(|v| {
        let (core, flagged, _) = split(&v);
        let mut s = String::from_utf8(core.to_vec()).expect("a UTF-8 core");
        if flagged {
            s.push('\u{1}');
        }
        s
    })
}

/// What a lock's tail records: metadata, token, and `since`: the server's
/// clock (ms) when it was taken, or [`VIRTUAL`] + its last lease and how
/// long it had been held then (see prelude.lua).
#[derive(Debug, PartialEq)]
struct Tail {
    metadata: String,
    token: u64,
    since: u64,
}

/// prelude.lua's VIRTUAL.
const VIRTUAL: u64 = 1 << 47;

/// A raw lock value split as prelude.lua's `unflag` does.
fn split(v: &[u8]) -> (&[u8], bool, Option<Tail>) {
    let flagged = v.last() == Some(&1);
    let v = if flagged { &v[..v.len() - 1] } else { v };
    if v.len() < 16 || v[v.len() - 1] != b'^' {
        return (v, flagged, None);
    }
    let m = v[v.len() - 2] as usize;
    let nums = &v[v.len() - 16..v.len() - 2];
    let token = u64::from_be_bytes(nums[..8].try_into().unwrap());
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&nums[8..14]);
    let core_len = v.len() - 16 - m;
    let tail = Tail {
        metadata: String::from_utf8(v[core_len..v.len() - 16].to_vec()).unwrap(),
        token,
        since: u64::from_be_bytes(ms),
    };
    (&v[..core_len], flagged, Some(tail))
}

/// The tail of lock `key`.
async fn tail_of(c: &mut MultiplexedConnection, ns: &str, key: &str) -> Tail {
    let raw: Vec<u8> = c.get(format!("{ns}{{{key}}}")).await.unwrap();
    split(&raw).2.expect("a tail")
}

/// When lock `key` was taken (the server's clock, ms), as inspect.lua
/// reports it.
async fn acquired_ms(c: &mut MultiplexedConnection, ns: &str, key: &str) -> u64 {
    let mut inv = inspect().prepare_invoke();
    inv.key(format!("{ns}{{{key}}}"))
        .key(format!("{ns}{{{key}}}:q"))
        .arg(1);
    let reply: Value = inv.invoke_async(c).await.expect("inspect.lua runs");
    let Value::Array(items) = reply else {
        panic!("{reply:?}")
    };
    match &items[1] {
        Value::Array(lock) => match (&lock[0], &lock[4]) {
            (Value::Int(1), Value::Int(at)) => *at as u64,
            other => panic!("not held: {other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// Waits (with a deadline) until the server's clock reads `at_least` ms.
async fn until_server_ms(c: &mut MultiplexedConnection, at_least: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while server_ms(c).await < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "the server's clock stands still"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The server's clock in ms.
async fn server_ms(c: &mut MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(c).await.unwrap();
    s * 1000 + us / 1000
}

fn with_metadata(metadata: &str) -> Q<'_> {
    Q {
        metadata,
        ..NO_QUEUE
    }
}

// Tails (prelude.lua): what inspection reads.

#[tokio::test]
async fn a_lock_records_its_token_the_servers_clock_and_its_metadata() {
    let (mut c, ns) = setup().await;
    let before = server_ms(&mut c).await;
    // '^' and a NUL-free owner that ends like a tail change nothing: the
    // tail is read from the end, by its length byte.
    let meta = "job=nightly^ x";
    let reply = take_q(
        &mut c,
        &ns,
        &["a", "b"],
        "u^",
        NONCE,
        5_000,
        with_metadata(meta),
    )
    .await;
    let (tokens, _) = granted(&reply);
    let after = server_ms(&mut c).await;
    for (key, token) in ["a", "b"].into_iter().zip(&tokens) {
        let tail = tail_of(&mut c, &ns, key).await;
        assert_eq!(tail.token, *token as u64);
        assert_eq!(tail.metadata, meta);
        // A lease: the tail was written without reading the clock.
        assert_eq!(tail.since, VIRTUAL + 5_000, "{tail:?}");
        let at = acquired_ms(&mut c, &ns, key).await;
        assert!((before.saturating_sub(2)..=after + 2).contains(&at), "{at}");
    }
    assert_eq!(
        value_of(&mut c, &ns, "a").await.unwrap(),
        format!("u^{NONCE}")
    );
    // The owner still releases it: its core is found whatever the tail holds.
    assert_eq!(free(&mut c, &ns, &["a", "b"], "u^", "").await, [1, 1]);
}

#[tokio::test]
async fn reentry_records_the_new_token_and_keeps_time_and_metadata() {
    let (mut c, ns) = setup().await;
    granted(&take_q(&mut c, &ns, &["a"], "u1", NONCE, 0, with_metadata("first")).await);
    let first = tail_of(&mut c, &ns, "a").await;
    assert!(first.since < VIRTUAL, "no lease: the clock, {first:?}");
    // Time passes, so that an acquisition time recomputed wrongly shows.
    until_server_ms(&mut c, first.since + 30).await;
    // Re-entered without a lease, then with one (the permanent lock is
    // rewritten as a leased one: the tail must survive that too), then with
    // another.
    for ttl in [0, 5_000, 8_000] {
        let (t, re) = granted(
            &take_q(
                &mut c,
                &ns,
                &["a"],
                "u1",
                NONCE2,
                ttl,
                with_metadata("again"),
            )
            .await,
        );
        assert_eq!(re, [1]);
        let tail = tail_of(&mut c, &ns, "a").await;
        assert_eq!(tail.token, t[0] as u64, "the newest token");
        // The clock's reading stays: it is true whatever the lease.
        assert_eq!((tail.since, tail.metadata.as_str()), (first.since, "first"));
        assert_eq!(acquired_ms(&mut c, &ns, "a").await, first.since);
    }
    assert!(lease_ms(&mut c, &ns, "a").await > 5_000);
}

#[tokio::test]
async fn extend_keeps_the_tail_and_a_handoff_writes_the_successors() {
    let (mut c, ns) = setup().await;
    granted(
        &take_q(
            &mut c,
            &ns,
            &["k"],
            "a",
            NONCE,
            0,
            with_metadata("holder-a"),
        )
        .await,
    );
    let before = tail_of(&mut c, &ns, "k").await;
    assert_eq!(prolong(&mut c, &ns, &["k"], "a", 5_000).await, 0);
    assert_eq!(
        tail_of(&mut c, &ns, "k").await,
        before,
        "a lease given to a lock without one changes no tail"
    );
    ints(&take_q(&mut c, &ns, &["k"], "b", NONCE2, 0, queued("p1")).await);
    let succ = Succ {
        owner: "b",
        nonce: NONCE2,
        ttl: 5_000,
        pid: "p1",
        more: false,
        metadata: "holder-b",
    };
    let r = free_full(&mut c, &ns, &["k"], "a", "", Some(succ)).await;
    assert_eq!(value_of(&mut c, &ns, "k").await, Some(format!("b{NONCE2}")));
    let tail = tail_of(&mut c, &ns, "k").await;
    assert_eq!(
        (tail.token, tail.metadata.as_str(), tail.since),
        (r[1] as u64, "holder-b", VIRTUAL + 5_000)
    );
    assert!(tail.token > before.token);
}

#[tokio::test]
async fn extending_a_lease_keeps_the_acquisition_time() {
    let (mut c, ns) = setup().await;
    let mut named_taken = 0;
    for owner in ["", "u1"] {
        let key = if owner.is_empty() { "anon" } else { "named" };
        granted(&take(&mut c, &ns, &[key], owner, NONCE, 5_000).await);
        let taken = acquired_ms(&mut c, &ns, key).await;
        named_taken = taken;
        until_server_ms(&mut c, taken + 40).await;
        for ttl in [20_000, 3_000] {
            assert_eq!(prolong(&mut c, &ns, &[key], owner, ttl).await, 0);
            let at = acquired_ms(&mut c, &ns, key).await;
            assert!(at.abs_diff(taken) <= 2, "{owner:?}: {at} vs {taken}");
            let since = tail_of(&mut c, &ns, key).await.since;
            assert!(since >= VIRTUAL + 40 + ttl, "{since}");
            let left = lease_ms(&mut c, &ns, key).await;
            assert!(left > ttl as i64 - 1_000 && left <= ttl as i64, "{left}");
        }
    }
    // A re-entry with a new lease rewrites the tail the same way.
    granted(&take(&mut c, &ns, &["named"], "u1", NONCE2, 7_000).await);
    let at = acquired_ms(&mut c, &ns, "named").await;
    assert!(at.abs_diff(named_taken) <= 2, "{at} vs {named_taken}");
    let since = tail_of(&mut c, &ns, "named").await.since;
    assert!(since >= VIRTUAL + 40 + 7_000, "{since}");
    assert!(lease_ms(&mut c, &ns, "named").await > 6_000);
}

fn queued(pid: &str) -> Q<'_> {
    Q {
        pid,
        entry: pid,
        ..NO_QUEUE
    }
}

#[tokio::test]
async fn a_conflict_queues_the_process_once_with_a_lifetime() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["k"], "holder", NONCE, 0).await);
    for _ in 0..3 {
        let r = ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("p1")).await);
        assert_eq!(r[0], 0);
    }
    assert_eq!(queue_of(&mut c, &ns, "k").await, ["p1"]);
    let q = format!("{ns}{{k}}:q");
    let ttl: i64 = c.pttl(&q).await.unwrap();
    assert!((9_000..=10_000).contains(&ttl), "{ttl}");
    // Another conflict lengthens a queue's life that fell short of its
    // need, and never shortens a longer one.
    for (set, expected) in [(1_000, 9_000..=10_000), (60_000, 59_000..=60_000)] {
        let _: () = c.pexpire(&q, set).await.unwrap();
        take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("p1")).await;
        let ttl: i64 = c.pttl(&q).await.unwrap();
        assert!(expected.contains(&ttl), "after PEXPIRE {set}: {ttl}");
    }
    // A single attempt (no entry) does not queue.
    ints(
        &take_q(
            &mut c,
            &ns,
            &["k"],
            "w2",
            NONCE2,
            0,
            Q {
                pid: "p2",
                ..NO_QUEUE
            },
        )
        .await,
    );
    assert_eq!(queue_of(&mut c, &ns, "k").await, ["p1"]);
}

#[tokio::test]
async fn a_release_reserves_the_lock_for_the_first_listening_process() {
    let (mut c, ns) = setup().await;
    let mut p1 = Listener::new(&ns, "p1").await;
    granted(&take(&mut c, &ns, &["k"], "holder", NONCE, 0).await);
    // "gone" never listens: it is skipped.
    ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("gone")).await);
    ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("p1")).await);
    assert_eq!(free(&mut c, &ns, &["k"], "holder", "").await, [1]);
    assert_eq!(p1.next().await, format!("r{ns}{{k}}"));
    assert_eq!(value_of(&mut c, &ns, "k").await.as_deref(), Some("\0p1"));
    let pttl = lease_ms(&mut c, &ns, "k").await;
    assert!((0..=CLAIM_MS as i64).contains(&pttl));
    assert!(queue_of(&mut c, &ns, "k").await.is_empty());
    // Nobody else can take it; p1 claims it.
    let r = ints(&take(&mut c, &ns, &["k"], "barger", NONCE, 0).await);
    assert_eq!(r[..2], [0, 1]);
    let (tokens, _) = granted(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 5_000, queued("p1")).await);
    assert!(tokens[0] > 0);
    assert_eq!(value_of(&mut c, &ns, "k").await, Some(format!("w{NONCE2}")));
}

/// Entries popped past the one the lock is reserved for go back to the head
/// of the queue, in their order and with a life of their own (the pop takes
/// several at once, and may have emptied the queue); woken entries before it
/// are gone, each process told.
#[tokio::test]
async fn entries_behind_the_reserved_one_keep_their_places() {
    let (mut c, ns) = setup().await;
    let mut woken = Listener::new(&ns, "woken").await;
    let mut p1 = Listener::new(&ns, "p1").await;
    granted(&take(&mut c, &ns, &["k"], "holder", NONCE, 0).await);
    let wake = Q {
        pid: "woken",
        entry: "~woken",
        ..NO_QUEUE
    };
    ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, wake).await);
    for pid in ["gone", "p1", "p2", "p3"] {
        ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued(pid)).await);
    }
    assert_eq!(
        queue_of(&mut c, &ns, "k").await,
        ["~woken", "gone", "p1", "p2", "p3"]
    );
    assert_eq!(free(&mut c, &ns, &["k"], "holder", "").await, [1]);
    assert_eq!(woken.next().await, format!("w{ns}{{k}}"));
    assert_eq!(p1.next().await, format!("r{ns}{{k}}"));
    assert_eq!(value_of(&mut c, &ns, "k").await.as_deref(), Some("\0p1"));
    assert_eq!(queue_of(&mut c, &ns, "k").await, ["p2", "p3"]);
    // The pop emptied the queue: rebuilt, it lives as long as any waiter
    // may ask (an hour), not less than the waiters behind asked for.
    let ttl: i64 = c.pttl(format!("{ns}{{k}}:q")).await.unwrap();
    assert!((3_600_000..=3_700_000).contains(&ttl), "{ttl}");

    // A queue longer than one pop: the rest stays, and so does its life.
    granted(&take(&mut c, &ns, &["j"], "holder", NONCE, 0).await);
    let pids = ["gone", "p1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "q9"];
    for pid in pids {
        ints(&take_q(&mut c, &ns, &["j"], "w", NONCE2, 0, queued(pid)).await);
    }
    let before: i64 = c.pttl(format!("{ns}{{j}}:q")).await.unwrap();
    assert_eq!(free(&mut c, &ns, &["j"], "holder", "").await, [1]);
    assert_eq!(p1.next().await, format!("r{ns}{{j}}"));
    assert_eq!(queue_of(&mut c, &ns, "j").await, pids[2..]);
    let after: i64 = c.pttl(format!("{ns}{{j}}:q")).await.unwrap();
    assert!(
        after <= before && after > before - 5_000,
        "{before} then {after}"
    );
}

/// A lock whose lease ran out is free for whoever asks first, even with
/// processes queued (they wake when the lease ends and ask again); the
/// first of them to ask flags it, and its release serves them.
#[tokio::test]
async fn a_lapsed_lock_goes_to_whoever_asks_first_and_its_release_serves_the_queue() {
    let (mut c, ns) = setup().await;
    let mut p1 = Listener::new(&ns, "p1").await;
    granted(&take(&mut c, &ns, &["k"], "holder", NONCE, 30_000).await);
    ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("p1")).await);
    assert_eq!(
        value_of(&mut c, &ns, "k").await,
        Some(format!("holder{NONCE}\u{1}")),
        "flagged: someone waits"
    );
    lapse(&mut c, &ns, "k").await;
    granted(&take_q(&mut c, &ns, &["k"], "new", NONCE, 0, queued("p2")).await);
    assert_eq!(
        queue_of(&mut c, &ns, "k").await,
        ["p1"],
        "p1 keeps its place"
    );
    let new_value = format!("new{}", nonce_for(NONCE, 0));
    assert_eq!(value_of(&mut c, &ns, "k").await, Some(new_value.clone()));
    // p1 asks again: still queued once, and the lock is flagged.
    let r = ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("p1")).await);
    assert_eq!(r, [0, 1, -1]);
    assert_eq!(queue_of(&mut c, &ns, "k").await, ["p1"]);
    assert_eq!(
        value_of(&mut c, &ns, "k").await,
        Some(format!("{new_value}\u{1}"))
    );
    assert_eq!(free(&mut c, &ns, &["k"], "new", "").await, [1]);
    assert_eq!(p1.next().await, format!("r{ns}{{k}}"));
    assert_eq!(value_of(&mut c, &ns, "k").await.as_deref(), Some("\0p1"));
}

#[tokio::test]
async fn a_release_hands_the_lock_straight_to_a_local_successor() {
    let (mut c, ns) = setup().await;
    let (t0, _) = granted(&take(&mut c, &ns, &["k"], "a", NONCE, 0).await);
    ints(&take_q(&mut c, &ns, &["k"], "b", NONCE2, 0, queued("p1")).await);
    let succ = Succ {
        owner: "b",
        nonce: NONCE2,
        ttl: 5_000,
        pid: "p1",
        more: true,
        metadata: "",
    };
    let r = free_full(&mut c, &ns, &["k"], "a", "", Some(succ)).await;
    assert_eq!(r[0], 1);
    assert!(r[1] > t0[0], "the successor's token is newer");
    assert_eq!(
        value_of(&mut c, &ns, "k").await,
        Some(format!("b{NONCE2}\u{1}")),
        "flagged: p1 has more waiters"
    );
    let pttl = lease_ms(&mut c, &ns, "k").await;
    assert!((4_000..=5_000).contains(&pttl));
    // More local waiters follow: p1 stays queued, now at the back.
    assert_eq!(queue_of(&mut c, &ns, "k").await, ["p1"]);
}

#[tokio::test]
async fn another_process_queued_first_gets_the_lock_before_a_local_successor() {
    let (mut c, ns) = setup().await;
    let mut p2 = Listener::new(&ns, "p2").await;
    granted(&take(&mut c, &ns, &["k"], "a", NONCE, 0).await);
    ints(&take_q(&mut c, &ns, &["k"], "x", NONCE2, 0, queued("p2")).await);
    ints(&take_q(&mut c, &ns, &["k"], "b", NONCE2, 0, queued("p1")).await);
    let succ = Succ {
        owner: "b",
        nonce: NONCE2,
        ttl: 0,
        pid: "p1",
        more: false,
        metadata: "",
    };
    let r = free_full(&mut c, &ns, &["k"], "a", "", Some(succ)).await;
    assert_eq!(r, [1, 0], "no direct grant");
    assert_eq!(p2.next().await, format!("r{ns}{{k}}"));
    assert_eq!(value_of(&mut c, &ns, "k").await.as_deref(), Some("\0p2"));
    assert_eq!(queue_of(&mut c, &ns, "k").await, ["p1"]);
}

#[tokio::test]
async fn wake_entries_are_told_and_do_not_block() {
    let (mut c, ns) = setup().await;
    let mut p1 = Listener::new(&ns, "p1").await;
    granted(&take(&mut c, &ns, &["a"], "holder", NONCE, 0).await);
    let wake = Q {
        pid: "p1",
        entry: "~p1",
        ..NO_QUEUE
    };
    let r = ints(&take_q(&mut c, &ns, &["b", "a"], "multi", NONCE2, 0, wake).await);
    assert_eq!(r[..2], [0, 2]);
    assert_eq!(queue_of(&mut c, &ns, "a").await, ["~p1"]);
    assert!(queue_of(&mut c, &ns, "b").await.is_empty());
    assert_eq!(free(&mut c, &ns, &["a"], "holder", "").await, [1]);
    assert_eq!(p1.next().await, format!("w{ns}{{a}}"));
    assert_eq!(
        value_of(&mut c, &ns, "a").await,
        None,
        "woken, not reserved"
    );
    granted(&take_q(&mut c, &ns, &["b", "a"], "multi", NONCE2, 0, wake).await);
}

/// Runs withdraw.lua for process `pid`'s handoff entry in lock `key`'s queue.
async fn withdraw_handoff(c: &mut MultiplexedConnection, ns: &str, key: &str, pid: &str) -> i64 {
    withdraw()
        .key(format!("{ns}{{{key}}}"))
        .key(format!("{ns}{{{key}}}:q"))
        .arg(pid)
        .arg(pid)
        .arg(CLAIM_MS)
        .arg(format!("{ns}c:"))
        .invoke_async(c)
        .await
        .expect("withdraw.lua runs")
}

#[tokio::test]
async fn withdraw_passes_a_reservation_on() {
    let (mut c, ns) = setup().await;
    let mut p2 = Listener::new(&ns, "p2").await;
    let _p1 = Listener::new(&ns, "p1").await;
    granted(&take(&mut c, &ns, &["k"], "a", NONCE, 0).await);
    ints(&take_q(&mut c, &ns, &["k"], "x", NONCE2, 0, queued("p1")).await);
    ints(&take_q(&mut c, &ns, &["k"], "y", NONCE2, 0, queued("p2")).await);
    free(&mut c, &ns, &["k"], "a", "").await;
    assert_eq!(value_of(&mut c, &ns, "k").await.as_deref(), Some("\0p1"));
    let n = withdraw_handoff(&mut c, &ns, "k", "p1").await;
    assert_eq!(n, 1);
    assert_eq!(p2.next().await, format!("r{ns}{{k}}"));
    assert_eq!(value_of(&mut c, &ns, "k").await.as_deref(), Some("\0p2"));
}

/// A queue key of another type: withdraw leaves it alone, still frees a
/// reservation of the process, and answers 1.
#[tokio::test]
async fn withdraw_leaves_a_queue_of_another_type_alone() {
    let (mut c, ns) = setup().await;
    let _: () = c.set(format!("{ns}{{k}}"), "\0p1").await.unwrap();
    let _: () = c.set(format!("{ns}{{k}}:q"), "not a list").await.unwrap();
    let n = withdraw_handoff(&mut c, &ns, "k", "p1").await;
    assert_eq!(n, 1);
    assert_eq!(
        value_of(&mut c, &ns, "k").await,
        None,
        "the reservation is freed"
    );
    let q: String = c.get(format!("{ns}{{k}}:q")).await.unwrap();
    assert_eq!(q, "not a list");
}

#[tokio::test]
async fn release_all_of_an_owner_hands_its_locks_on() {
    let (mut c, ns) = setup().await;
    let mut p1 = Listener::new(&ns, "p1").await;
    granted(&take(&mut c, &ns, &["k"], "u1", NONCE, 0).await);
    ints(&take_q(&mut c, &ns, &["k"], "w", NONCE2, 0, queued("p1")).await);
    let n: i64 = release_all()
        .key(format!("{ns}{{u1}}:o"))
        .key(format!("{ns}{{u1}}:p"))
        .arg("owner")
        .arg("u1")
        .arg(CLAIM_MS)
        .arg(format!("{ns}c:"))
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(p1.next().await, format!("r{ns}{{k}}"));
}

/// A retry of one acquisition (same owner and nonce, after a lost reply)
/// finds the lock its own, anonymous or not, and renews its lease.
#[tokio::test]
async fn a_retry_with_the_same_nonce_finds_its_own_lock() {
    let (mut c, ns) = setup().await;
    granted(&take(&mut c, &ns, &["anon"], "", NONCE, 1_000).await);
    let (_, reentered) = granted(&take(&mut c, &ns, &["anon"], "", NONCE, 5_000).await);
    assert_eq!(reentered, [0], "taken by this call, not re-entered");
    let pttl = lease_ms(&mut c, &ns, "anon").await;
    assert!(pttl > 4_000, "{pttl}");
    // Another anonymous acquisition still conflicts.
    assert_eq!(
        ints(&take(&mut c, &ns, &["anon"], "", NONCE2, 0).await)[0],
        0
    );
}
