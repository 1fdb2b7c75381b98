//! The binding of `lua/withdraw.lua`: its KEYS and ARGV.

use super::Arg;
use crate::redis::layout::Layout;

/// One call of `withdraw.lua`: a process stops waiting for a lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WithdrawArgs<'a> {
    /// KEYS[1]: the lock key (KEYS[2], its queue, follows from it).
    pub(crate) lock_key: &'a str,
    /// ARGV[1]: the queue entry to remove (`"<pid>"` or `"~<pid>"`).
    pub(crate) entry: &'a str,
    /// ARGV[2]: the pid whose reservation, if the lock has one, is passed
    /// on (`""`: leave any reservation alone).
    pub(crate) pid: &'a str,
    /// ARGV[3]: how long a reservation lasts unclaimed, ms.
    pub(crate) claim_ms: u64,
    /// ARGV[4]: the channel prefix processes are told on.
    pub(crate) channel_prefix: &'a str,
}

impl WithdrawArgs<'_> {
    /// KEYS in the script's order.
    pub(crate) fn keys(&self, layout: &Layout) -> Vec<String> {
        vec![self.lock_key.to_owned(), layout.queue_key(self.lock_key)]
    }

    /// ARGV in the script's order.
    pub(crate) fn argv(&self) -> [Arg<'_>; 4] {
        [
            self.entry.into(),
            self.pid.into(),
            self.claim_ms.into(),
            self.channel_prefix.into(),
        ]
    }
}
