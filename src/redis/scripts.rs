//! The Lua scripts, compiled into the binary and hashed once.
//!
//! Each is invoked with `EVALSHA`; on `NOSCRIPT` (a restarted or flushed
//! server) redis-rs loads it on the same connection and retries. Their
//! KEYS/ARGV/return contracts are at the top of each file in `lua/`, and
//! `tests/scripts.rs` checks each against a real server. The scripts that
//! hand locks on are prefixed with `lua/prelude.lua`, their shared helpers.

use std::sync::LazyLock;

use redis::Script;

macro_rules! with_prelude {
    ($file:literal) => {
        concat!(
            include_str!("../../lua/prelude.lua"),
            "\n",
            include_str!($file)
        )
    };
}

/// `lua/acquire.lua`: all keys or none, re-entry, fencing tokens, queueing.
pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("../../lua/acquire.lua")));

/// `lua/release.lua`: owner- (or nonce-) checked release, per key, with handoff.
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("../../lua/release.lua")));

/// `lua/extend.lua`: owner-checked lease extension, all or nothing.
pub(crate) static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/extend.lua")));

/// `lua/release_all.lua`: one owner's locks, or the namespace's.
pub(crate) static RELEASE_ALL: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("../../lua/release_all.lua")));

/// `lua/release_all.lua` for a Redis Cluster, flagged to touch keys of
/// several slots (those one master serves): its slots and namespace modes
/// visit keys the caller cannot name up front. A shebang must open a
/// script, so the flag comes before the prelude. Sent with `EVAL` to every
/// master (release_all is rare; the servers cache it by its hash).
#[cfg(feature = "cluster")]
pub(crate) const RELEASE_ALL_CLUSTER_SOURCE: &str = concat!(
    "#!lua flags=allow-cross-slot-keys\n",
    include_str!("../../lua/prelude.lua"),
    "\n",
    include_str!("../../lua/release_all.lua")
);

/// `lua/withdraw.lua`: a process stops waiting for a lock.
pub(crate) static WITHDRAW: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_prelude!("../../lua/withdraw.lua")));

/// Every script, to load them up front.
pub(crate) fn all() -> [&'static Script; 5] {
    [&ACQUIRE, &RELEASE, &EXTEND, &RELEASE_ALL, &WITHDRAW]
}
