//! The binding of `lua/acquire.lua`: its ARGV, and its reply.

use redis::Value;

use super::{Arg, flag};
use crate::error::LockError;
use crate::redis::error::unexpected;
use crate::redis::wire::clock_us;

/// `acquire.lua`'s ARGV, by name. Its KEYS are a
/// [`Keyset`](crate::redis::keyset::Keyset).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AcquireArgs<'a> {
    /// ARGV[2]: the owner; `""` for an anonymous lock.
    pub(crate) owner: &'a str,
    /// ARGV[3]: this acquisition's nonce (see [`nonce`](crate::redis::wire::nonce)).
    pub(crate) nonce: &'a str,
    /// ARGV[4]: the lease in ms; 0 for none.
    pub(crate) ttl_ms: u64,
    /// ARGV[5]: the calling process's pid, or `""`: a lock reserved for
    /// that process is free for this call.
    pub(crate) pid: &'a str,
    /// ARGV[6]: the queue entry to add on conflict (`"<pid>"`, `"~<pid>"`
    /// or `""`).
    pub(crate) entry: &'a str,
    /// ARGV[7]: how long a queue touched by the call must live, ms.
    pub(crate) queue_ttl_ms: u64,
    /// ARGV[8]: the caller has more waiters for these locks.
    pub(crate) more: bool,
    /// ARGV[9]: leave re-entered leases alone (a cluster request over
    /// several slots; see `cluster/mod.rs`).
    pub(crate) keep_reentered_lease: bool,
    /// ARGV[10] (at least; see [`coarse_floor`]): a floor for the fencing
    /// tokens, µs (a Redlock set's clock), or 0.
    pub(crate) token_floor: u64,
    /// ARGV[11]: the holder's metadata for inspection (`""`: none), checked
    /// by the module (at most 255 bytes, no control characters).
    pub(crate) metadata: &'a str,
}

impl AcquireArgs<'_> {
    /// ARGV in the script's order, for a request of `lock_count` locks.
    pub(crate) fn argv(&self, lock_count: usize) -> [Arg<'_>; 11] {
        [
            lock_count.into(),
            self.owner.into(),
            self.nonce.into(),
            self.ttl_ms.into(),
            self.pid.into(),
            self.entry.into(),
            self.queue_ttl_ms.into(),
            flag(self.more),
            flag(self.keep_reentered_lease),
            self.token_floor.max(coarse_floor()).into(),
            self.metadata.into(),
        ]
    }
}

/// How coarse the clock floor of ordinary acquisitions is, µs.
const FLOOR_STEP_US: u64 = 100_000;

/// This host's clock rounded down to [`FLOOR_STEP_US`]: the floor every
/// acquisition gives its fencing tokens. A slot's counter that fell behind
/// (a replica promoted after missing increments, a restart without
/// persistence) jumps to it, above the tokens it missed unless they were
/// handed out within the last step or ran ahead of the clock; a counter at
/// or above it is only incremented, so the floor costs a write to the
/// counter about once per step per slot, not per acquisition.
fn coarse_floor() -> u64 {
    clock_us() / FLOOR_STEP_US * FLOOR_STEP_US
}

/// A decoded reply of `acquire.lua`.
#[derive(Debug)]
pub(crate) enum AcquireReply {
    /// Every lock taken: a token and a re-entry flag per key.
    Acquired {
        tokens: Vec<u64>,
        reentered: Vec<bool>,
    },
    /// The lock at `index` is held; its lease ends in `pttl` ms (-1: never).
    Held { index: usize, pttl: i64 },
    /// The key at `index` holds a value of another type.
    Foreign { index: usize },
}

impl AcquireReply {
    /// Decodes a reply to a request of `n` locks.
    pub(crate) fn decode(reply: Value, n: usize) -> Result<AcquireReply, LockError> {
        let bad = |what: &str| unexpected("acquire", what);
        let items = match reply {
            Value::Array(items) => items,
            // The fast path's reply: one free lock taken with this token.
            Value::Int(token) if n == 1 && token > 0 => {
                return Ok(AcquireReply::Acquired {
                    tokens: vec![token as u64],
                    reentered: vec![false],
                });
            }
            _ => return Err(bad("neither an array nor a token")),
        };
        let int = |v: &Value| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        };
        let ints = |v: &Value| match v {
            Value::Array(a) => a.iter().map(int).collect::<Option<Vec<i64>>>(),
            _ => None,
        };
        match items.first().and_then(int) {
            Some(1) => {
                let tokens = items
                    .get(1)
                    .and_then(ints)
                    .ok_or_else(|| bad("no tokens"))?;
                let reentered = items
                    .get(2)
                    .and_then(ints)
                    .ok_or_else(|| bad("no re-entry flags"))?;
                if tokens.len() != n || reentered.len() != n || tokens.iter().any(|t| *t <= 0) {
                    return Err(bad("tokens do not match the keys"));
                }
                Ok(AcquireReply::Acquired {
                    tokens: tokens.into_iter().map(|t| t as u64).collect(),
                    reentered: reentered.into_iter().map(|r| r == 1).collect(),
                })
            }
            Some(0) => {
                let index = items.get(1).and_then(int).ok_or_else(|| bad("no index"))?;
                let pttl = items.get(2).and_then(int).unwrap_or(-1);
                if index < 1 || index as usize > n {
                    return Err(bad("index out of range"));
                }
                Ok(AcquireReply::Held {
                    index: index as usize - 1,
                    pttl,
                })
            }
            Some(2) => {
                let index = items.get(1).and_then(int).ok_or_else(|| bad("no index"))?;
                // Indices past the lock keys name internal keys; report the
                // first lock key then, the one the caller can act on.
                let index = index.max(1) as usize - 1;
                Ok(AcquireReply::Foreign {
                    index: if index < n { index } else { 0 },
                })
            }
            _ => Err(bad("unknown status")),
        }
    }

    /// Whether the reply says every lock was taken (before decoding it).
    pub(crate) fn is_granted(reply: &Value) -> bool {
        match reply {
            Value::Int(token) => *token > 0,
            Value::Array(items) => items.first() == Some(&Value::Int(1)),
            _ => false,
        }
    }
}
