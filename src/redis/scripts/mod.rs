//! The Lua scripts, compiled into the binary and hashed once, and one
//! binding per script.
//!
//! Each is invoked with `EVALSHA` ([`evalsha`]); on `NOSCRIPT` (a restarted
//! or flushed server) it is loaded on the same connection and sent again. Their
//! KEYS/ARGV/return contracts are at the top of each file in `lua/`, and
//! `tests/scripts.rs` checks each against a real server. The scripts that
//! hand locks on are prefixed with `lua/prelude.lua`, their shared helpers.
//!
//! A binding (`acquire.rs`, `release.rs`, ...) is the only Rust code that
//! knows its script's KEYS and ARGV order: a typed struct builds them, and
//! a decoder turns the reply into a typed value.

pub(crate) mod acquire;
pub(crate) mod extend;
pub(crate) mod inspect;
pub(crate) mod release;
pub(crate) mod release_all;
pub(crate) mod withdraw;

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisResult, Script, Value};

/// `prelude.lua`, a newline, then the script at `$file` (relative to the
/// repository's `lua/`).
macro_rules! with_prelude {
    ($file:literal) => {
        concat!(
            include_str!("../../../lua/prelude.lua"),
            "\n",
            include_str!(concat!("../../../lua/", $file))
        )
    };
}

/// `lua/acquire.lua`: all keys or none, re-entry, fencing tokens, queueing.
pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("acquire.lua")));

/// `lua/release.lua`: owner- (or nonce-) checked release, per key, with handoff.
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("release.lua")));

/// `lua/extend.lua`: owner-checked lease extension, all or nothing.
pub(crate) static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("extend.lua")));

/// The source of `lua/release_all.lua`, prelude included (a Redis Cluster
/// sends it with a flag line in front).
pub(crate) const RELEASE_ALL_SOURCE: &str = with_prelude!("release_all.lua");

/// `lua/release_all.lua`: one owner's locks, or the namespace's.
pub(crate) static RELEASE_ALL: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_ALL_SOURCE));

/// `lua/withdraw.lua`: a process stops waiting for a lock.
pub(crate) static WITHDRAW: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("withdraw.lua")));

/// `lua/inspect.lua`: what each lock looks like (reads only).
pub(crate) static INSPECT: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("inspect.lua")));

/// `lua/force_release.lua`: an operator frees a lock whoever holds it.
pub(crate) static FORCE_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("force_release.lua")));

/// Every script, to load them up front.
pub(crate) fn all() -> [&'static Script; 7] {
    [
        &ACQUIRE,
        &RELEASE,
        &EXTEND,
        &RELEASE_ALL,
        &WITHDRAW,
        &INSPECT,
        &FORCE_RELEASE,
    ]
}

/// The name of one of the scripts (its file's stem), for metrics.
pub(crate) fn name(script: &Script) -> &'static str {
    let names = [
        "acquire",
        "release",
        "extend",
        "release_all",
        "withdraw",
        "inspect",
        "force_release",
    ];
    all()
        .iter()
        .position(|s| std::ptr::eq(*s, script) || s.get_hash() == script.get_hash())
        .map_or("other", |i| names[i])
}

/// Runs `script` with `keys` and `args` by its hash, loading it on
/// `NOSCRIPT` and sending it once more.
///
/// The command is built in one buffer: redis-rs's `ScriptInvocation`
/// copies every key and argument once more on the way, which on the
/// uncontended path is a good part of the client's work.
pub(crate) async fn evalsha<C: ConnectionLike>(
    conn: &mut C,
    script: &Script,
    keys: &[String],
    args: &[String],
) -> RedisResult<Value> {
    // Sized up front: built by appending, the buffer would be copied as it
    // grows, several times per call.
    let data: usize = keys.iter().chain(args).map(String::len).sum();
    let mut cmd = redis::Cmd::with_capacity(3 + keys.len() + args.len(), 64 + data);
    cmd.arg("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            // Boxed: rare, and inline its future would be allocated and
            // copied with every call.
            Box::pin(script.prepare_invoke().load_async(conn)).await?;
            crate::metrics::script_reloaded(name(script));
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// `"1"` or `"0"`, the scripts' booleans.
pub(crate) fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_owned()
}
