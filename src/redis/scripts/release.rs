//! The binding of `lua/release.lua`: its KEYS and ARGV, and its reply.

use redis::Value;

use super::{Arg, flag};
use crate::error::LockError;
use crate::redis::error::unexpected;
use crate::redis::layout::Layout;

/// A local waiter a release may hand its first lock to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Successor<'a> {
    /// ARGV[7]: its owner (`""`: anonymous).
    pub(crate) owner: &'a str,
    /// ARGV[8]: its acquisition's nonce.
    pub(crate) nonce: &'a str,
    /// ARGV[9]: its lease, ms (0: none).
    pub(crate) ttl_ms: u64,
    /// The part of its owner's index to record the lock in (ARGV[10] says
    /// whether): the expiring one with a lease, else the permanent one.
    pub(crate) index: Option<&'a str>,
    /// ARGV[12]: more local waiters come after it.
    pub(crate) more: bool,
    /// ARGV[14]: its holder metadata (`""`: none).
    pub(crate) metadata: &'a str,
}

/// One call of `release.lua`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReleaseArgs<'a> {
    /// KEYS[1..n]: the lock keys (all in one slot on a cluster).
    pub(crate) lock_keys: &'a [String],
    /// The permanent part of the releasing owner's index, if it has one
    /// (ARGV[6] says whether).
    pub(crate) index: Option<&'a str>,
    /// ARGV[2]: the owner (`""`: anonymous locks only).
    pub(crate) owner: &'a str,
    /// ARGV[3]: a nonce, to release only what that acquisition took; `""`
    /// for whatever the owner holds.
    pub(crate) nonce: &'a str,
    /// ARGV[4]: how long a reservation lasts unclaimed, ms.
    pub(crate) claim_ms: u64,
    /// ARGV[5]: the channel prefix processes are told on.
    pub(crate) channel_prefix: &'a str,
    /// ARGV[7..10, 12]: the waiter to hand the first lock to.
    pub(crate) successor: Option<Successor<'a>>,
    /// ARGV[11]: the releasing process's pid.
    pub(crate) pid: &'a str,
}

impl ReleaseArgs<'_> {
    /// KEYS: the locks, their fencing counters and queues, then the owner's
    /// index and the successor's, if any.
    pub(crate) fn keys(&self, layout: &Layout) -> Vec<String> {
        let mut keys = self.lock_keys.to_vec();
        keys.extend(self.lock_keys.iter().map(|k| layout.fence_key_of(k)));
        keys.extend(self.lock_keys.iter().map(|k| layout.queue_key(k)));
        keys.extend(self.index.map(str::to_owned));
        keys.extend(self.successor.and_then(|s| s.index).map(str::to_owned));
        keys
    }

    /// ARGV in the script's order; without a successor only the first six
    /// (the script reads the rest as "no successor").
    pub(crate) fn argv(&self) -> Vec<Arg<'_>> {
        let mut argv = Vec::with_capacity(14);
        argv.extend([
            self.lock_keys.len().into(),
            self.owner.into(),
            self.nonce.into(),
            self.claim_ms.into(),
            self.channel_prefix.into(),
            flag(self.index.is_some()),
        ]);
        let Some(s) = self.successor else {
            return argv;
        };
        argv.extend([
            s.owner.into(),
            s.nonce.into(),
            s.ttl_ms.into(),
            flag(s.index.is_some()),
            self.pid.into(),
            flag(s.more),
            // ARGV[13]: a queue the handoff touches outlives two claims.
            (2 * self.claim_ms + 1000).into(),
            s.metadata.into(),
        ]);
        argv
    }

    /// Per key whether it was released, and the successor's token if it
    /// got the first lock (else 0).
    pub(crate) fn decode(&self, reply: Value) -> Result<(Vec<bool>, u64), LockError> {
        let n = self.lock_keys.len();
        if let (1, Value::Int(released)) = (n, &reply) {
            // One key, not handed on: whether it was released.
            return Ok((vec![*released == 1], 0));
        }
        let mut flags: Vec<i64> =
            redis::from_redis_value(reply).map_err(|e| unexpected("release", e))?;
        if flags.len() != n + 1 {
            return Err(unexpected("release", "wrong number of results"));
        }
        let token = flags.pop().unwrap_or(0).max(0) as u64;
        Ok((flags.into_iter().map(|f| f == 1).collect(), token))
    }
}
