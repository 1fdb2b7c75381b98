//! Random bits without a system call per draw: acquisition nonces and
//! jitter, drawn on every acquisition.
//!
//! A v4 UUID reads the operating system's randomness (`getrandom`) each
//! time, a system call on the uncontended path. std's `RandomState` is
//! seeded from it once per thread, and every new one differs from the last;
//! SipHash under its keys gives 64 bits as unpredictable as that seed, and
//! distinct per call but for chance. That is what a nonce needs: unique
//! among the acquisitions of a key, not secret.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// 64 random bits.
pub(crate) fn u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn draws_differ_and_use_every_bit() {
        let draws: Vec<u64> = (0..10_000).map(|_| super::u64()).collect();
        let distinct: HashSet<_> = draws.iter().collect();
        assert_eq!(distinct.len(), draws.len(), "a repeated draw");
        let (ones, zeros) = draws.iter().fold((0, !0), |(o, z), d| (o | d, z & d));
        assert_eq!((ones, zeros), (!0, 0), "a bit never set, or never clear");
    }

    #[test]
    fn threads_draw_apart() {
        let a: HashSet<u64> = (0..1_000).map(|_| super::u64()).collect();
        let b: HashSet<u64> = std::thread::spawn(|| (0..1_000).map(|_| super::u64()).collect())
            .join()
            .unwrap();
        assert!(a.is_disjoint(&b));
    }
}
