//! How lock names become Redis key names.
//!
//! For a namespace `ns` (default `lockstep:`), a lock key `k` and an owner
//! `o`, with `esc` escaping `%`, `{` and `}` as `%25`, `%7B`, `%7D`:
//!
//! | Redis key           | holds                                               |
//! |---------------------|-----------------------------------------------------|
//! | `ns{esc(k)}`        | the lock: `<owner><12-byte nonce>`, with its lease  |
//! | `ns{T}:f`           | the fencing counter of the lock's hash slot         |
//! | `ns{esc(k)}:q`      | the lock's wait queue: processes waiting (list)     |
//! | `ns{esc(o)}:o`      | the owner's locks with a lease (sorted set, expires)|
//! | `ns{esc(o)}:p`      | the owner's locks without expiry (sorted set)       |
//!
//! The braces are a Redis Cluster hash tag: the lock key hashes on `esc(k)`
//! alone, whatever the namespace. Escaping keeps user braces from changing
//! the tag, and makes the mapping injective. `T` is a short tag chosen so that
//! it hashes to the same slot as `esc(k)`: every lock has its counter in its
//! own slot (so one script can touch both on a cluster), and there are at
//! most 16384 counters per namespace however many distinct keys are ever
//! locked. Readable names are kept for ordinary keys: `order_1` is stored as
//! `lockstep:{order_1}`.

use std::borrow::Cow;
use std::sync::LazyLock;

/// Redis Cluster's number of hash slots.
const SLOTS: usize = 16384;

/// The key layout of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    namespace: String,
}

impl Layout {
    /// The namespace must be checked by [`check_namespace`] first.
    pub(crate) fn new(namespace: &str) -> Self {
        Layout {
            namespace: namespace.to_owned(),
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `ns{esc(key)}`
    pub(crate) fn lock_key(&self, key: &str) -> String {
        concat(&[&self.namespace, "{", &escape(key), "}"])
    }

    /// `ns{T}:f`, where `T` hashes to the slot of `key`'s lock.
    #[cfg(test)]
    pub(crate) fn fence_key(&self, key: &str) -> String {
        let slot = key_slot(escape(key).as_bytes());
        format!("{}{{{}}}:f", self.namespace, SLOT_TAGS[slot as usize])
    }

    /// `ns{T}:f` for an already-mapped lock key `ns{esc(key)}`.
    pub(crate) fn fence_key_of(&self, lock_key: &str) -> String {
        let tag = &slot_tags()[self.slot_of(lock_key) as usize];
        concat(&[&self.namespace, "{", tag, "}:f"])
    }

    /// `<lock key>:q`: the wait queue of a lock (same hash slot).
    pub(crate) fn queue_key(&self, lock_key: &str) -> String {
        concat(&[lock_key, ":q"])
    }

    /// `ns{esc(owner)}:o` and `ns{esc(owner)}:p`
    pub(crate) fn owner_index(&self, owner: &str) -> OwnerIndex {
        let owner = escape(owner);
        OwnerIndex {
            expiring: concat(&[&self.namespace, "{", &owner, "}:o"]),
            permanent: concat(&[&self.namespace, "{", &owner, "}:p"]),
        }
    }

    /// The hash slot of an already-mapped lock key `ns{esc(key)}`.
    pub(crate) fn slot_of(&self, lock_key: &str) -> u16 {
        key_slot(&lock_key.as_bytes()[self.namespace.len() + 1..lock_key.len() - 1])
    }

    /// A `SCAN MATCH` pattern for every key of the namespace.
    pub(crate) fn scan_pattern(&self) -> String {
        let mut p = glob_escape(&self.namespace);
        p.push('*');
        p
    }

    /// A `SCAN MATCH` pattern for the lock keys of the locks whose names
    /// start with `prefix` (only lock keys end with the tag's `}`).
    pub(crate) fn lock_scan_pattern(&self, prefix: &str) -> String {
        format!(
            "{}{{{}*}}",
            glob_escape(&self.namespace),
            glob_escape(&escape(prefix))
        )
    }

    /// The lock's name, for a lock key `ns{esc(key)}` of this namespace.
    pub(crate) fn key_of(&self, lock_key: &str) -> Option<String> {
        let inner = lock_key
            .strip_prefix(self.namespace.as_str())?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        if inner.contains(['{', '}']) {
            return None;
        }
        Some(
            inner
                .replace("%7B", "{")
                .replace("%7D", "}")
                .replace("%25", "%"),
        )
    }
}

/// `s` with Redis's glob characters escaped.
fn glob_escape(s: &str) -> String {
    let mut p = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p
}

/// A named owner's index, in two parts: its locks with a lease (expiring
/// with the longest of them) and those without (see `lua/prelude.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnerIndex {
    pub(crate) expiring: String,
    pub(crate) permanent: String,
}

impl OwnerIndex {
    /// The part a lock with a lease of `ttl_ms` (0: none) is recorded in.
    pub(crate) fn part_for(&self, ttl_ms: u64) -> &str {
        if ttl_ms > 0 {
            &self.expiring
        } else {
            &self.permanent
        }
    }
}

/// Why a namespace cannot be used, if it cannot.
pub(crate) fn check_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty() {
        return Err("the namespace is empty; it must set lockstep's keys apart".into());
    }
    if ns.len() > 256 {
        return Err(format!(
            "the namespace is {} bytes long; the limit is 256",
            ns.len()
        ));
    }
    if ns.contains(['{', '}']) {
        return Err(
            "the namespace contains '{' or '}', which would change the keys' hash slots".into(),
        );
    }
    Ok(())
}

/// `parts` joined, in one allocation of the right size: keys are built on
/// every call, and `format!` grows its buffer as it goes.
fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.push_str(p);
    }
    out
}

/// Escapes `%`, `{` and `}`; other bytes (newlines, non-ASCII) are kept.
pub(crate) fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '{', '}']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Every slot's tag, in slot order: a short string that hashes to it.
pub(crate) fn slot_tags() -> &'static [String] {
    &SLOT_TAGS
}

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of a hash tag's content.
pub(crate) fn key_slot(tag: &[u8]) -> u16 {
    crc16(tag) % SLOTS as u16
}

/// For each slot, a short alphanumeric tag that hashes to it. Built once by
/// trying base-36 numbers in order: about 160,000 CRCs, well under a
/// millisecond in release builds.
static SLOT_TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut tags: Vec<Option<String>> = vec![None; SLOTS];
    let mut missing = SLOTS;
    let mut n: u64 = 0;
    while missing > 0 {
        let tag = base36(n);
        let slot = key_slot(tag.as_bytes()) as usize;
        if tags[slot].is_none() {
            tags[slot] = Some(tag);
            missing -= 1;
        }
        n += 1;
    }
    tags.into_iter()
        .map(|t| t.expect("every slot was filled"))
        .collect()
});

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_map_back_to_their_names() {
        let layout = Layout::new("ns:");
        for key in ["order_1", "a{b}c", "%7B", "50%", "x:q", "é"] {
            let lock_key = layout.lock_key(key);
            assert_eq!(layout.key_of(&lock_key).as_deref(), Some(key), "{lock_key}");
        }
        assert_eq!(layout.key_of("ns:{a}:q"), None);
        assert_eq!(layout.key_of("other:{a}"), None);
        assert_eq!(layout.lock_scan_pattern("a*{"), "ns:{a\\*%7B*}");
    }

    #[test]
    fn crc16_matches_redis() {
        // Test vectors from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
    }

    #[test]
    fn every_slot_has_a_tag_of_its_own_slot() {
        for (slot, tag) in SLOT_TAGS.iter().enumerate() {
            assert_eq!(key_slot(tag.as_bytes()) as usize, slot);
            assert!(tag.len() <= 4 && tag.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn a_lock_and_its_counter_share_a_slot() {
        let l = Layout::new("lockstep:");
        for key in ["order_1", "}x", "{a}", "naïve", "line\nbreak", "%7B"] {
            let lock = l.lock_key(key);
            let fence = l.fence_key(key);
            assert_eq!(redis_slot(&lock), redis_slot(&fence), "{key}");
            assert_eq!(fence, l.fence_key_of(&lock));
            assert_eq!(redis_slot(&lock), redis_slot(&l.queue_key(&lock)));
            assert_eq!(l.slot_of(&lock), redis_slot(&lock));
        }
    }

    #[test]
    fn escaping_is_injective_and_keeps_plain_keys() {
        let l = Layout::new("lockstep:");
        assert_eq!(l.lock_key("order_1"), "lockstep:{order_1}");
        assert_eq!(l.lock_key("{a}"), "lockstep:{%7Ba%7D}");
        assert_ne!(l.lock_key("%7B"), l.lock_key("{"));
        assert_eq!(l.owner_index("run-1").expiring, "lockstep:{run-1}:o");
        assert_eq!(l.owner_index("run-1").permanent, "lockstep:{run-1}:p");
    }

    #[test]
    fn scan_patterns_escape_globs() {
        assert_eq!(Layout::new("a*b?[c]:").scan_pattern(), "a\\*b\\?\\[c\\]:*");
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(check_namespace("lockstep:").is_ok());
        assert!(check_namespace("").is_err());
        assert!(check_namespace("a{b").is_err());
        assert!(check_namespace(&"n".repeat(257)).is_err());
    }

    /// The slot Redis computes for a full key name (hash tag rules).
    fn redis_slot(key: &str) -> u16 {
        let b = key.as_bytes();
        if let Some(open) = b.iter().position(|&c| c == b'{')
            && let Some(len) = b[open + 1..].iter().position(|&c| c == b'}')
            && len > 0
        {
            return key_slot(&b[open + 1..open + 1 + len]);
        }
        key_slot(b)
    }
}
