//! The binding of `lua/release_all.lua` in its owner and namespace modes
//! (its slots mode, for a Redis Cluster, is bound in `cluster/`).

use redis::Value;

use super::Arg;
use crate::error::LockError;
use crate::redis::error::unexpected;
use crate::redis::layout::OwnerIndex;

/// One call of `release_all.lua`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReleaseAllArgs<'a> {
    /// Every lock in one owner's index.
    Owner {
        /// KEYS[1], KEYS[2]: the owner's index.
        index: &'a OwnerIndex,
        /// ARGV[2]: the owner.
        owner: &'a str,
        /// ARGV[3]: how long a reservation lasts unclaimed, ms.
        claim_ms: u64,
        /// ARGV[4]: the channel prefix queued processes are told on.
        channel_prefix: &'a str,
    },
    /// Every lock of the namespace.
    Namespace {
        /// ARGV[2]: the namespace.
        namespace: &'a str,
        /// ARGV[3]: a SCAN MATCH pattern for it.
        pattern: &'a str,
        /// ARGV[4]: the channel prefix (`""`: nobody is told).
        channel_prefix: &'a str,
    },
}

impl ReleaseAllArgs<'_> {
    /// KEYS in the script's order.
    pub(crate) fn keys(&self) -> Vec<String> {
        match self {
            ReleaseAllArgs::Owner { index, .. } => {
                vec![index.expiring.clone(), index.permanent.clone()]
            }
            ReleaseAllArgs::Namespace { .. } => Vec::new(),
        }
    }

    /// ARGV in the script's order.
    pub(crate) fn argv(&self) -> [Arg<'_>; 4] {
        match *self {
            ReleaseAllArgs::Owner {
                owner,
                claim_ms,
                channel_prefix,
                ..
            } => [
                "owner".into(),
                owner.into(),
                claim_ms.into(),
                channel_prefix.into(),
            ],
            ReleaseAllArgs::Namespace {
                namespace,
                pattern,
                channel_prefix,
            } => [
                "namespace".into(),
                namespace.into(),
                pattern.into(),
                channel_prefix.into(),
            ],
        }
    }

    /// How many locks were released.
    pub(crate) fn decode(reply: Value) -> Result<u64, LockError> {
        redis::from_redis_value::<u64>(reply).map_err(|e| unexpected("release_all", e))
    }
}
