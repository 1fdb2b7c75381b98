//! The Lua scripts, compiled into the binary and hashed once, and one
//! binding per script.
//!
//! Each is invoked as a function of one library ([`LIBRARY`], `FCALL`) where
//! the server has functions, else with `EVALSHA` ([`evalsha`]); on a
//! missing function or `NOSCRIPT` (a restarted or flushed server) it is
//! loaded on the same connection and sent again. Their
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, OnceLock};

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisResult, Script, Value};

/// The prelude, compiled into the binary.
const PRELUDE: &str = include_str!("../../../lua/prelude.lua");

/// One of the scripts: by `EVALSHA` (prelude and script in one source), or
/// as its function in the [`LIBRARY`].
pub(crate) struct Lua {
    /// Its file's stem, for metrics and the function's name.
    pub(crate) name: &'static str,
    /// The script without the prelude (the library's function body).
    body: &'static str,
    /// Prelude, a newline and script: what `EVALSHA` runs.
    source: String,
    script: Script,
    /// Its function's name in the library (made once: the library's name
    /// depends on every script).
    function: OnceLock<String>,
}

impl Lua {
    fn new(name: &'static str, body: &'static str) -> Self {
        let source = format!("{PRELUDE}\n{body}");
        Lua {
            name,
            body,
            script: Script::new(&source),
            source,
            function: OnceLock::new(),
        }
    }

    /// The script as `EVALSHA` runs it.
    pub(crate) fn script(&self) -> &Script {
        &self.script
    }

    /// Its source as `EVALSHA` runs it: the prelude, a newline, the script.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Its function's name in the library.
    fn function(&self) -> &str {
        self.function
            .get_or_init(|| format!("{}_{}", LIBRARY.name, self.name))
    }
}

macro_rules! lua {
    ($name:literal) => {
        LazyLock::new(|| Lua::new($name, include_str!(concat!("../../../lua/", $name, ".lua"))))
    };
}

/// `lua/acquire.lua`: all keys or none, re-entry, fencing tokens, queueing.
pub(crate) static ACQUIRE: LazyLock<Lua> = lua!("acquire");

/// `lua/release.lua`: owner- (or nonce-) checked release, per key, with handoff.
pub(crate) static RELEASE: LazyLock<Lua> = lua!("release");

/// `lua/extend.lua`: owner-checked lease extension, all or nothing.
pub(crate) static EXTEND: LazyLock<Lua> = lua!("extend");

/// `lua/release_all.lua`: one owner's locks, or the namespace's.
pub(crate) static RELEASE_ALL: LazyLock<Lua> = lua!("release_all");

/// `lua/withdraw.lua`: a process stops waiting for a lock.
pub(crate) static WITHDRAW: LazyLock<Lua> = lua!("withdraw");

/// `lua/inspect.lua`: what each lock looks like (reads only).
pub(crate) static INSPECT: LazyLock<Lua> = lua!("inspect");

/// `lua/force_release.lua`: an operator frees a lock whoever holds it.
pub(crate) static FORCE_RELEASE: LazyLock<Lua> = lua!("force_release");

/// Every script, to load them up front.
pub(crate) fn all() -> [&'static Lua; 7] {
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

/// Every script as one Redis function library (Redis 7 and later):
/// the prelude once, then each script as the body of a function
/// `<library>_<script>` with KEYS and ARGV as its parameters.
///
/// Why: `EVALSHA` runs its whole source on every call, and the prelude's
/// two dozen helper definitions cost the server about 1 µs per call before
/// the script does anything. In a library they run once, at `FUNCTION
/// LOAD`. The prelude's per-call state, its cached clock reading, is reset
/// as each function starts (its memo of the index score may outlive a
/// call). The name carries a hash of the source, so that libraries of
/// different lockstep versions live side by side on one server, and a
/// library of that name is this very source.
pub(crate) struct Library {
    /// `lockstep_<12 hex digits of the source's SHA-1>`.
    pub(crate) name: String,
    /// What `FUNCTION LOAD` gets.
    pub(crate) source: String,
}

pub(crate) static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    // The library's code with its functions' names prefixed by `prefix`:
    // hashed without one (the name comes from the hash), loaded with it.
    let code = |prefix: &str| {
        let mut code = format!("{PRELUDE}\n");
        for lua in all() {
            code.push_str(&format!(
                "local function {name}(KEYS, ARGV)\nclock_us = nil\n{body}\nend\n\
                 redis.register_function{{function_name = '{prefix}{name}', \
                 callback = {name}, flags = {flags}}}\n",
                name = lua.name,
                body = lua.body,
                flags = flags(lua.name),
            ));
        }
        code
    };
    let name = format!("lockstep_{}", &Script::new(&code("")).get_hash()[..12]);
    let source = format!("#!lua name={name}\n{}", code(&format!("{name}_")));
    Library { name, source }
});

/// What the server checks before a script's function runs. Without flags
/// a function counts as a writer that must not start while the server is
/// out of memory (a script run by `EVALSHA` only has its memory-growing
/// commands refused then): releasing, extending, withdrawing and
/// force-releasing free or keep memory and must work exactly then, and
/// inspecting only reads (so it also runs where writes are refused).
fn flags(script: &str) -> &'static str {
    match script {
        "acquire" => "{}",
        "inspect" => "{'no-writes'}",
        _ => "{'allow-oom'}",
    }
}

/// Whether `e`, an answer to `FCALL` or `FUNCTION LOAD`, says that this
/// server or user does not do functions at all: a server without them,
/// `FCALL` or `FUNCTION` renamed away, or an ACL that refuses them (not a
/// refusal of one of the keys).
pub(crate) fn refuses_functions(e: &redis::RedisError) -> bool {
    let detail = e.detail().unwrap_or("");
    if e.code() == Some("NOPERM") {
        return detail.contains("'fcall") || detail.contains("'function");
    }
    detail.starts_with("unknown command") || detail.starts_with("unknown subcommand")
}

/// Whether `e` says the function is not there, or functions are refused
/// (see [`refuses_functions`]): a server that lost the library (restarted
/// without persistence, `FUNCTION FLUSH`, a new cluster node). The call did
/// not run.
fn no_function(e: &redis::RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
        || refuses_functions(e)
}

/// Loads the [`LIBRARY`]. A library of its name is already this source:
/// finding one there (another process, or another call of this one, loaded
/// it) counts as loaded, and costs the server no compilation.
///
/// # Errors
///
/// A server or user without functions ([`refuses_functions`]), or any
/// other failure (no connection, out of memory).
pub(crate) async fn load_library<C: ConnectionLike>(conn: &mut C) -> RedisResult<()> {
    match redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&LIBRARY.source)
        .query_async::<String>(conn)
        .await
    {
        Err(e) if e.detail().is_some_and(|d| d.contains("already exists")) => Ok(()),
        other => other.map(drop),
    }
}

/// Runs `lua` with `keys` and `args`: as its function while `functions`
/// is set, otherwise by `EVALSHA`, loading what the server lacks and
/// sending the call once more. A server or user that refuses functions
/// ([`refuses_functions`], also when only `FCALL` is refused) turns
/// `functions` off for good; any other failure to load is the call's error.
pub(crate) async fn invoke<C: ConnectionLike>(
    conn: &mut C,
    lua: &Lua,
    keys: &[String],
    args: &[Arg<'_>],
    functions: &AtomicBool,
) -> RedisResult<Value> {
    if functions.load(Ordering::Relaxed) {
        let cmd = command("FCALL", lua.function(), keys, args);
        match cmd.query_async(conn).await {
            Err(e) if no_function(&e) => {
                // Boxed: rare, and inline its future would be allocated and
                // copied with every call.
                match Box::pin(load_library(conn)).await {
                    Ok(()) => {
                        crate::metrics::script_reloaded(lua.name);
                        match cmd.query_async(conn).await {
                            // Loading is allowed, calling is not.
                            Err(e) if refuses_functions(&e) => {}
                            other => return other,
                        }
                    }
                    Err(e) if refuses_functions(&e) => {}
                    Err(e) => return Err(e),
                }
                functions.store(false, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    evalsha(conn, lua, keys, args).await
}

/// `verb target numkeys keys... args...` in one buffer: redis-rs's
/// `ScriptInvocation` copies every key and argument once more on the way,
/// which on the uncontended path is a good part of the client's work.
fn command(verb: &str, target: &str, keys: &[String], args: &[Arg<'_>]) -> redis::Cmd {
    // Sized up front: built by appending, the buffer would be copied as it
    // grows, several times per call.
    let data: usize =
        keys.iter().map(String::len).sum::<usize>() + args.iter().map(Arg::len).sum::<usize>();
    let mut cmd = redis::Cmd::with_capacity(3 + keys.len() + args.len(), 64 + target.len() + data);
    cmd.arg(verb)
        .arg(target)
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    cmd
}

/// Runs `lua` with `keys` and `args` by its hash, loading it on
/// `NOSCRIPT` and sending it once more.
pub(crate) async fn evalsha<C: ConnectionLike>(
    conn: &mut C,
    lua: &Lua,
    keys: &[String],
    args: &[Arg<'_>],
) -> RedisResult<Value> {
    let cmd = command("EVALSHA", lua.script.get_hash(), keys, args);
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            Box::pin(lua.script.prepare_invoke().load_async(conn)).await?;
            crate::metrics::script_reloaded(lua.name);
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// `"1"` or `"0"`, the scripts' booleans.
pub(crate) fn flag(on: bool) -> Arg<'static> {
    Arg::Str(if on { "1" } else { "0" })
}

/// One ARGV value of a script, borrowed or a number: written straight into
/// the command's buffer, without a `String` of its own (on the uncontended
/// path the allocations were a good part of the client's work).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arg<'a> {
    Str(&'a str),
    Int(u64),
}

impl Arg<'_> {
    /// At most how many bytes it takes in the command.
    fn len(&self) -> usize {
        match self {
            Arg::Str(s) => s.len(),
            Arg::Int(_) => 20,
        }
    }
}

impl From<u64> for Arg<'_> {
    fn from(n: u64) -> Self {
        Arg::Int(n)
    }
}

impl From<usize> for Arg<'_> {
    fn from(n: usize) -> Self {
        Arg::Int(n as u64)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(s: &'a str) -> Self {
        Arg::Str(s)
    }
}

impl redis::ToRedisArgs for Arg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Arg::Str(s) => s.write_redis_args(out),
            Arg::Int(n) => n.write_redis_args(out),
        }
    }
}
