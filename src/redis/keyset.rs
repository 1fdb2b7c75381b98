//! The Redis keys of one acquisition: `acquire.lua`'s KEYS.

use std::sync::atomic::{AtomicBool, Ordering};

use super::layout::{Layout, OwnerIndex};

/// The Redis keys of one request: the lock keys, then their fencing
/// counters and wait queues, then the owner's index (both parts) if it has
/// one: the KEYS of `acquire.lua`, in its order.
#[derive(Debug)]
pub(crate) struct Keyset {
    /// How many lock keys there are (they come first in `keys`).
    pub(crate) lock_count: usize,
    /// Every key, in the script's order.
    pub(crate) keys: Vec<String>,
    /// Whether the owner is indexed (on a cluster, a request over several
    /// slots has an index per slot, and none here).
    pub(crate) indexed: bool,
    /// Set when an attempt got no reply: it may have taken the locks.
    uncertain: AtomicBool,
}

impl Keyset {
    /// The keys for `locks` (already-mapped lock keys) and an owner index.
    pub(crate) fn new(
        layout: &Layout,
        locks: Vec<String>,
        owner_index: Option<OwnerIndex>,
    ) -> Self {
        let lock_count = locks.len();
        let mut keys = locks;
        keys.reserve(2 * lock_count + 2);
        for i in 0..lock_count {
            let fence = layout.fence_key_of(&keys[i]);
            keys.push(fence);
        }
        for i in 0..lock_count {
            let queue = layout.queue_key(&keys[i]);
            keys.push(queue);
        }
        let indexed = owner_index.is_some();
        if let Some(index) = owner_index {
            // Moved, not copied: the index is read back from `keys`.
            keys.push(index.expiring);
            keys.push(index.permanent);
        }
        Keyset {
            lock_count,
            keys,
            indexed,
            uncertain: AtomicBool::new(false),
        }
    }

    /// The owner's index, for owners whose locks `release_all` must find:
    /// both parts end `keys`, when there is one.
    pub(crate) fn owner_index(&self) -> Option<OwnerIndex> {
        match &self.keys[3 * self.lock_count..] {
            [expiring, permanent] => Some(OwnerIndex {
                expiring: expiring.clone(),
                permanent: permanent.clone(),
            }),
            _ => None,
        }
    }

    /// The lock keys.
    pub(crate) fn locks(&self) -> &[String] {
        &self.keys[..self.lock_count]
    }

    /// Records that an attempt may have taken the locks without an answer.
    pub(crate) fn set_uncertain(&self) {
        self.uncertain.store(true, Ordering::Relaxed);
    }

    /// Whether some attempt may have taken the locks without an answer.
    pub(crate) fn is_uncertain(&self) -> bool {
        self.uncertain.load(Ordering::Relaxed)
    }
}
