//! One jittered exponential backoff, for every retry loop of the crate.
//!
//! Each pause is the current step scaled by a random factor in [0.5, 1),
//! then the step doubles up to its maximum: waiters that lost the same race
//! spread out instead of retrying in lockstep (governor's `jitter.rs` makes
//! the same point).

use std::time::Duration;

use crate::random;

/// A jittered, doubling pause between retries.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    /// Pauses from about `min` up to `max`.
    pub(crate) const fn new(min: Duration, max: Duration) -> Self {
        Backoff { step: min, max }
    }

    /// The next pause: the current step, jittered; the step then doubles.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.step.mul_f64(0.5 + 0.5 * unit_random());
        self.step = (self.step * 2).min(self.max);
        pause
    }
}

/// A random fraction in [0, 1), for jitter.
pub(crate) fn unit_random() -> f64 {
    // 53 random bits: as many as an f64's mantissa holds.
    const BITS: u32 = 53;
    (random::u64() >> (64 - BITS)) as f64 / (1u64 << BITS) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_jittered_and_double_up_to_the_maximum() {
        let (min, max) = (Duration::from_millis(8), Duration::from_millis(50));
        let mut b = Backoff::new(min, max);
        let mut step = min;
        for _ in 0..10 {
            let pause = b.next_pause();
            assert!(
                pause >= step / 2 && pause < step,
                "{pause:?} for a step of {step:?}"
            );
            step = (step * 2).min(max);
        }
        for _ in 0..1000 {
            let r = unit_random();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
