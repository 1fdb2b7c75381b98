//! The local gate of multi-key waiters: what a provider knows of its own
//! claims on its keys, so that its multi-key waiters do not retry into an
//! attempt bound to fail.
//!
//! Multi-key waiters are woken to retry (no handoff can serve them). When
//! the calls that contend for a key live in one process, every release
//! woke every multi-key waiter of the key into an attempt, one round trip
//! each, of which at most one could succeed, and then withdrawals of the
//! queue entries those attempts left (on PostgreSQL's W3: 4.4 statements
//! per acquisition where 2 do). So each provider keeps, per key, a
//! [`Mark`]: a lock one of its calls holds (until its lease would end), or
//! a multi-key attempt on its way. A multi-key waiter attempts only when no
//! other call of its provider has a mark on one of its keys (one attempt at
//! a time per key), and the release that clears a mark wakes them.
//!
//! The marks are advisory: the server still decides. A stale mark (a lock
//! freed elsewhere, say by an operator's force-release) holds a waiter back
//! for at most its fallback period, after which it attempts anyway; a
//! missing one costs an attempt that fails, as before.

use tokio::time::Instant;

/// A provider's own claim on a key.
#[derive(Debug)]
pub(crate) enum Mark {
    /// One of its calls took the lock, with this owner (`None`:
    /// anonymous), until this lease end (`None`: no expiry).
    Held {
        owner: Option<String>,
        until: Option<Instant>,
    },
    /// A multi-key waiter (by its address) is attempting.
    Attempt(usize),
}

/// Whether a multi-key waiter may attempt.
pub(crate) enum Gate {
    /// Yes: its keys now carry its attempt's mark, until it ends.
    Open,
    /// No: another call has the key at this index, until (at the latest)
    /// this instant (`None`: until woken).
    Closed(usize, Option<Instant>),
}

impl Mark {
    /// A lock mark for a lock of `owner`, until `until`.
    pub(crate) fn held(owner: Option<&str>, until: Option<Instant>) -> Mark {
        Mark::Held {
            owner: owner.map(str::to_owned),
            until,
        }
    }

    fn is_live(&self, now: Instant) -> bool {
        match self {
            Mark::Held { until, .. } => until.is_none_or(|u| u > now),
            Mark::Attempt(_) => true,
        }
    }

    /// Whether it is a lock mark whose lease ended.
    pub(crate) fn is_stale(&self, now: Instant) -> bool {
        !self.is_live(now)
    }

    /// Whether it is a lock mark (of `owner`, when given).
    pub(crate) fn is_held_by(&self, owner: Option<Option<&str>>) -> bool {
        match self {
            Mark::Held { owner: o, .. } => owner.is_none_or(|owner| o.as_deref() == owner),
            Mark::Attempt(_) => false,
        }
    }

    /// Whether it is the attempt mark of waiter `me`.
    pub(crate) fn is_attempt_of(&self, me: usize) -> bool {
        matches!(self, Mark::Attempt(id) if *id == me)
    }
}

/// Whether the multi-key waiter `me` (of `owner`) may attempt: no mark of
/// another call is on one of its keys, `marks` (one per key, in order). A
/// named owner passes its own lock marks (it re-enters those locks). If it
/// may, the caller puts its attempt mark on every key with [`claim`].
pub(crate) fn check<'a>(
    marks: impl Iterator<Item = Option<&'a Mark>>,
    me: usize,
    owner: Option<&str>,
) -> Gate {
    let now = Instant::now();
    for (i, mark) in marks.enumerate() {
        match mark {
            None => {}
            Some(m) if m.is_attempt_of(me) || m.is_stale(now) => {}
            Some(m) if owner.is_some() && m.is_held_by(Some(owner)) => {}
            Some(Mark::Held { until, .. }) => return Gate::Closed(i, *until),
            Some(Mark::Attempt(_)) => return Gate::Closed(i, None),
        }
    }
    Gate::Open
}

/// Puts the attempt mark of `me` on a key [`check`] let it through, unless
/// a live lock mark is there (its owner's own, which it re-enters).
pub(crate) fn claim(mark: &mut Option<Mark>, me: usize) {
    let now = Instant::now();
    if !mark
        .as_ref()
        .is_some_and(|m| m.is_held_by(None) && !m.is_stale(now))
    {
        *mark = Some(Mark::Attempt(me));
    }
}
