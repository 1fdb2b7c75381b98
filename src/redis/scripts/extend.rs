//! The binding of `lua/extend.lua`: its KEYS and ARGV, and its reply.

use redis::Value;

use super::Arg;
use crate::error::LockError;
use crate::redis::error::unexpected;
use crate::redis::layout::OwnerIndex;

/// One call of `extend.lua`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExtendArgs<'a> {
    /// KEYS[1..n]: the lock keys.
    pub(crate) lock_keys: &'a [String],
    /// KEYS[n+1], KEYS[n+2]: the owner's index, kept in step if the owner
    /// has one.
    pub(crate) index: Option<&'a OwnerIndex>,
    /// ARGV[2]: the owner (`""`: anonymous).
    pub(crate) owner: &'a str,
    /// ARGV[3]: the new lease, ms from now.
    pub(crate) ttl_ms: u64,
}

impl ExtendArgs<'_> {
    /// KEYS in the script's order.
    pub(crate) fn keys(&self) -> Vec<String> {
        let mut keys = self.lock_keys.to_vec();
        if let Some(index) = self.index {
            keys.push(index.expiring.clone());
            keys.push(index.permanent.clone());
        }
        keys
    }

    /// ARGV in the script's order.
    pub(crate) fn argv(&self) -> [Arg<'_>; 3] {
        [
            self.lock_keys.len().into(),
            self.owner.into(),
            self.ttl_ms.into(),
        ]
    }

    /// `None` when every lock was extended, else the position of the
    /// first lock not held by the owner (nothing was changed then).
    pub(crate) fn decode(&self, reply: Value) -> Result<Option<usize>, LockError> {
        match redis::from_redis_value::<i64>(reply).map_err(|e| unexpected("extend", e))? {
            0 => Ok(None),
            i if i >= 1 && (i as usize) <= self.lock_keys.len() => Ok(Some(i as usize - 1)),
            other => Err(unexpected("extend", format!("index {other}"))),
        }
    }
}
