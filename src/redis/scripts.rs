//! The Lua scripts, compiled into the binary and hashed once.
//!
//! Each is invoked with `EVALSHA`; on `NOSCRIPT` (a restarted or flushed
//! server) redis-rs loads it on the same connection and retries. Their
//! KEYS/ARGV/return contracts are at the top of each file in `lua/`, and
//! `tests/scripts.rs` checks each against a real server.

use std::sync::LazyLock;

use redis::Script;

/// `lua/acquire.lua`: all keys or none, re-entry, fencing tokens.
pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/acquire.lua")));

/// `lua/release.lua`: owner- (or nonce-) checked release, per key.
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/release.lua")));

/// `lua/extend.lua`: owner-checked lease extension, all or nothing.
pub(crate) static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/extend.lua")));

/// `lua/release_all.lua`: one owner's locks, or the namespace's.
pub(crate) static RELEASE_ALL: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/release_all.lua")));

/// Every script, to load them up front.
pub(crate) fn all() -> [&'static Script; 4] {
    [&ACQUIRE, &RELEASE, &EXTEND, &RELEASE_ALL]
}
