//! The ways of waiting for a held lock: polling (without notifications),
//! queued for a handoff (single-key, fair), and woken by releases
//! (multi-key or barging); and the guards that keep the local waiter
//! registry and the Redis queues honest however a wait ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tracing::Instrument;

use super::{Queueing, foreign, keep_trying, wait_span};
use crate::backoff::Backoff;
use crate::error::LockError;
use crate::gate::Gate;
use crate::metrics::{self, Wakeup};
use crate::provider::{AcquireRequest, Acquired, Wait};
use crate::redis::RedisProvider;
use crate::redis::keyset::Keyset;
use crate::redis::scripts::acquire::AcquireReply;
use crate::redis::waiting::{Entry, Waiter, Waiting, Withdrawal};
use crate::redis::wire::millis_ceil;

/// The first and the longest pause before retrying a contended lock when
/// polling, or any lock while Redis is away.
const RETRY: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(100));

/// The longest a wait queue is kept alive by one waiter without news.
const QUEUE_TTL_MAX: Duration = Duration::from_secs(3600);

/// The provider label of a call made to the provider directly (not
/// through a module).
const PROVIDER: &str = "locking-redis";

fn retry_backoff() -> Backoff {
    Backoff::new(RETRY.0, RETRY.1)
}

/// Keeps a single-key waiter's local registration honest however its call
/// ends: on drop (return, error, or a dropped future) it leaves the local
/// queue, withdraws the process's Redis queue entry when it was the last
/// local waiter, and undoes by nonce a lock that was (or may have been)
/// handed to it after it gave up.
struct LocalGuard<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    waiter: &'a Arc<Waiter>,
    key: Option<String>,
}

impl LocalGuard<'_> {
    /// The call holds the lock: it leaves the local queue, and the
    /// process's queue entry was already dealt with by the script.
    fn acquired(&mut self) {
        self.waiting.mark_gone(self.waiter);
        if let Some(key) = self.key.take() {
            let withdrawal = self.waiting.leave_single(&key, self.waiter, true);
            debug_assert!(
                withdrawal.is_none(),
                "a waiter that got the lock withdraws nothing"
            );
        }
    }
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        if self.waiting.mark_gone(self.waiter) {
            // Handed the lock (or maybe) after the call had decided to give
            // up: nobody will use it.
            self.provider.undo_later(
                vec![key.clone()],
                self.waiter.owner.clone(),
                self.waiter.nonce.clone(),
                None,
            );
        }
        if let Some(ticket) = self.waiting.leave_single(&key, self.waiter, false) {
            self.provider.withdraw_later(key, Entry::Handoff, ticket);
        }
    }
}

/// The same for a waiter that waits to be woken (multi-key or barging): it
/// is registered for all its keys, and queued in Redis on those it found
/// held (`enqueued`, indices into `keys`).
struct WokenGuard<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    waiter: &'a Arc<Waiter>,
    keys: &'a [String],
    enqueued: Vec<usize>,
    /// Its keys carry its attempt's mark (`crate::gate`).
    attempting: bool,
}

impl WokenGuard<'_> {
    /// The attempt the gate let through ended (`acquired`: with the locks,
    /// taken at `until` for their lease).
    fn attempted(&mut self, acquired: Option<(Option<&str>, Option<Instant>)>) {
        if let Some((owner, until)) = acquired {
            self.waiting.mark_held(self.keys, owner, until);
        }
        if std::mem::take(&mut self.attempting) {
            self.waiting.end_attempt(self.keys, self.waiter);
        }
    }
}

impl Drop for WokenGuard<'_> {
    fn drop(&mut self) {
        self.attempted(None);
        for (i, key) in self.keys.iter().enumerate() {
            let enqueued = self.enqueued.contains(&i);
            if let Some(ticket) = self.waiting.leave_woken(key, self.waiter, enqueued) {
                self.provider
                    .withdraw_later(key.clone(), Entry::Wake, ticket);
            }
        }
    }
}

/// Waits for a withdraw of this process's queue entry that was sent
/// before the waiter joined (see [`Withdrawal`]), so that its first attempt
/// is not undone by it; bounded by the response timeout and the deadline.
async fn after_withdrawals(withdrawals: Vec<Arc<Withdrawal>>, limit: Duration, wait: Wait) {
    let mut until = Instant::now() + limit;
    if let Wait::Until(deadline) = wait {
        until = until.min(deadline);
    }
    for w in withdrawals {
        let _ = tokio::time::timeout_at(until, w.wait()).await;
    }
}

impl RedisProvider {
    /// Waiting without notifications: jittered exponential backoff, never
    /// past the holder's lease nor past the deadline.
    pub(in crate::redis) async fn acquire_polling(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let mut backoff = retry_backoff();
        let mut span = None::<tracing::Span>;
        let mut counted = None::<metrics::Waiting>;
        loop {
            let sent_at = Instant::now();
            let (index, pttl) = match self.attempt(request, keys, nonce, None, 0).await {
                Ok(AcquireReply::Acquired { tokens, reentered }) => {
                    return Ok(Acquired::new(tokens, reentered, sent_at));
                }
                Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                Ok(AcquireReply::Held { index, pttl }) => (index, pttl),
                Err(e) if keep_trying(request, &e) => (0, RETRY.1.as_millis() as i64),
                Err(e) => return Err(e),
            };
            let key = &request.keys[index];
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(request.wait.give_up(key));
            }
            let mut nap = backoff.next_pause();
            if pttl > 0 {
                nap = nap.min(Duration::from_millis(pttl as u64 + 1));
            }
            if let Some(r) = remaining {
                nap = nap.min(r);
            }
            let span = span.get_or_insert_with(|| wait_span(key));
            counted.get_or_insert_with(|| metrics::Waiting::start(PROVIDER));
            sleep(nap).instrument(span.clone()).await;
            self.inner.conns.check_open()?;
        }
    }

    /// A single-key, fair wait: this process queues once in Redis; local
    /// waiters queue behind each other and are handed the lock in order.
    pub(in crate::redis) async fn acquire_queued(
        &self,
        waiting: &Arc<Waiting>,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let key = &keys.locks()[0];
        let owner = request.owner.as_deref().unwrap_or("");
        let ttl_ms = request.expire.map_or(0, millis_ceil);
        let metadata = request.metadata.as_deref().unwrap_or("");
        let waiter = Waiter::new(owner, nonce, ttl_ms, keys.owner_index(), metadata);
        let (mut attempt_now, withdrawal) = waiting.join_single(key, &waiter);
        let mut guard = LocalGuard {
            provider: self,
            waiting,
            waiter: &waiter,
            key: Some(key.clone()),
        };
        let span = wait_span(&request.keys[0]);
        let limit = 2 * self.inner.response_timeout;
        after_withdrawals(withdrawal.into_iter().collect(), limit, request.wait).await;
        let mut holder_expiry = None::<Instant>;
        let mut backoff = retry_backoff();
        let mut last_error = None::<LockError>;
        let mut handoff_deadline = None::<Instant>;
        let mut counted = None::<metrics::Waiting>;
        loop {
            if let Some((token, sent_at)) = waiter.granted() {
                guard.acquired();
                return Ok(Acquired::new(vec![token], vec![false], sent_at));
            }
            if attempt_now && waiter.begin_attempt() {
                let (reply, sent_at) = self
                    .attempt_first(waiting, request, keys, nonce, &waiter)
                    .await;
                match reply {
                    Ok(AcquireReply::Acquired { tokens, reentered }) => {
                        guard.acquired();
                        return Ok(Acquired::new(tokens, reentered, sent_at));
                    }
                    Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                    Ok(AcquireReply::Held { pttl, .. }) => {
                        holder_expiry = (pttl > 0)
                            .then(|| Instant::now() + Duration::from_millis(pttl as u64 + 1));
                    }
                    Err(e) if keep_trying(request, &e) => {
                        // Redis is away: try again soon, as the first waiter.
                        last_error = Some(e);
                        holder_expiry = Some(Instant::now() + backoff.next_pause());
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            let mut until = now + self.quiet_period(waiting, &mut backoff);
            // What ends the sleep if nothing wakes the waiter (None: the
            // deadline, which is no wake-up).
            let mut timer = Some(Wakeup::Fallback);
            if let Wait::Until(deadline) = request.wait
                && now >= deadline
            {
                // A release handing us the lock right now gets a short
                // grace to answer; past it, the lock may be ours without
                // our knowing, and the guard undoes it by nonce.
                let grace = *handoff_deadline.get_or_insert(now + limit);
                if !waiter.is_being_handed() || now >= grace {
                    if waiter.is_being_handed() {
                        waiter.set_unsure();
                    }
                    return Err(last_error
                        .take()
                        .unwrap_or_else(|| request.wait.give_up(&request.keys[0])));
                }
                until = grace;
                timer = None;
            } else {
                if let Some(at) = holder_expiry.filter(|_| waiting.is_first(key, &waiter))
                    && at < until
                {
                    until = at;
                    timer = Some(Wakeup::Expiry);
                }
                if let Wait::Until(deadline) = request.wait
                    && deadline < until
                {
                    until = deadline;
                    timer = None;
                }
            }
            counted.get_or_insert_with(|| metrics::Waiting::start(PROVIDER));
            let notified = waiter.sleep_until(until).instrument(span.clone()).await;
            metrics::woke(PROVIDER, notified, timer);
            waiter.take_woken();
            self.inner.conns.check_open()?;
            // Only the first local waiter speaks for the process; the
            // others wait for their turn or for a release to hand them
            // the lock.
            attempt_now = waiting.is_first(key, &waiter);
        }
    }

    /// An attempt of the process's first local waiter for a single key,
    /// queued as the process's handoff entry if the lock is held; and when
    /// it was sent (a handoff's token is as fresh as that).
    async fn attempt_first(
        &self,
        waiting: &Waiting,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
        waiter: &Arc<Waiter>,
    ) -> (Result<AcquireReply, LockError>, Instant) {
        let queueing = Queueing {
            pid: &waiting.pid,
            entry: &waiting.pid,
            more: waiting.others_waiting(&keys.locks()[0], waiter),
            queue_ttl_ms: self.queue_ttl_ms(request),
        };
        let sent_at = Instant::now();
        let reply = self.attempt(request, keys, nonce, Some(&queueing), 0).await;
        waiter.end_attempt();
        (reply, sent_at)
    }

    /// Waiting to be woken: multi-key requests, and every request when
    /// barging. Each wake-up is a new attempt.
    pub(in crate::redis) async fn acquire_woken(
        &self,
        waiting: &Arc<Waiting>,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let owner = request.owner.as_deref().unwrap_or("");
        let waiter = Waiter::new(owner, nonce, 0, None, "");
        // Registered for every key before the first attempt: a release can
        // be published before the reply that says which key was held
        // reaches us, and must not find nobody to wake.
        let withdrawals: Vec<Arc<Withdrawal>> = keys
            .locks()
            .iter()
            .filter_map(|key| waiting.join_woken(key, &waiter))
            .collect();
        let mut guard = WokenGuard {
            provider: self,
            waiting,
            waiter: &waiter,
            keys: keys.locks(),
            enqueued: Vec::new(),
            attempting: false,
        };
        let limit = 2 * self.inner.response_timeout;
        after_withdrawals(withdrawals, limit, request.wait).await;
        let entry = format!("~{}", waiting.pid);
        let mut span = None::<tracing::Span>;
        let mut backoff = retry_backoff();
        let mut counted = None::<metrics::Waiting>;
        // Multi-key waits pass the local gate (`crate::gate`): since when
        // this one has found it closed.
        let gated = keys.lock_count > 1;
        let mut blocked_since = None::<Instant>;
        loop {
            if gated {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                let fallback = since + self.inner.fallback;
                if Instant::now() < fallback {
                    match waiting.enter(keys.locks(), &waiter, request.owner.as_deref()) {
                        Gate::Open => guard.attempting = true,
                        Gate::Closed(index, until) => {
                            // Another call here has one of the keys: woken
                            // when it lets go, attempted anyway at the
                            // fallback (the mark is advisory).
                            let remaining = request.wait.remaining();
                            if remaining == Some(Duration::ZERO) {
                                return Err(request.wait.give_up(&request.keys[index]));
                            }
                            let mut at = until.map_or(fallback, |u| u.min(fallback));
                            if let Some(r) = remaining {
                                at = at.min(Instant::now() + r);
                            }
                            let span = span.get_or_insert_with(|| wait_span(&request.keys[index]));
                            counted.get_or_insert_with(|| metrics::Waiting::start(PROVIDER));
                            waiter.sleep_until(at).instrument(span.clone()).await;
                            waiter.take_woken();
                            self.inner.conns.check_open()?;
                            continue;
                        }
                    }
                }
                blocked_since = None;
            }
            let queueing = Queueing {
                pid: &waiting.pid,
                entry: &entry,
                more: false,
                queue_ttl_ms: self.queue_ttl_ms(request),
            };
            let sent_at = Instant::now();
            let reply = self.attempt(request, keys, nonce, Some(&queueing), 0).await;
            let acquired = matches!(reply, Ok(AcquireReply::Acquired { .. }));
            guard.attempted(acquired.then(|| {
                let until = request.expire.map(|d| sent_at + d);
                (request.owner.as_deref(), until)
            }));
            let (index, pttl) = match reply {
                Ok(AcquireReply::Acquired { tokens, reentered }) => {
                    // Wake entries left in queues cost one stray message at
                    // the next release: cheaper than a call to remove them
                    // (and other local waiters may still need them).
                    guard.enqueued.clear();
                    return Ok(Acquired::new(tokens, reentered, sent_at));
                }
                Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                Ok(AcquireReply::Held { index, pttl }) => {
                    if !guard.enqueued.contains(&index) {
                        guard.enqueued.push(index);
                    }
                    (index, pttl)
                }
                // Redis is away: try again soon.
                Err(e) if keep_trying(request, &e) => (0, backoff.next_pause().as_millis() as i64),
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(request.wait.give_up(&request.keys[index]));
            }
            let fallback = self.quiet_period(waiting, &mut backoff);
            let mut until = now + fallback;
            let mut timer = Some(Wakeup::Fallback);
            if pttl > 0 {
                let expiry = now + Duration::from_millis(pttl as u64 + 1);
                if expiry < until {
                    until = expiry;
                    timer = Some(Wakeup::Expiry);
                }
            }
            if let Some(r) = remaining
                && now + r < until
            {
                until = now + r;
                timer = None;
            }
            let span = span.get_or_insert_with(|| wait_span(&request.keys[index]));
            counted.get_or_insert_with(|| metrics::Waiting::start(PROVIDER));
            let notified = waiter.sleep_until(until).instrument(span.clone()).await;
            metrics::woke(PROVIDER, notified, timer);
            waiter.take_woken();
            self.inner.conns.check_open()?;
        }
    }

    /// How long a waiter sleeps without news: the fallback period while
    /// notifications arrive, a jittered backoff while they cannot.
    fn quiet_period(&self, waiting: &Waiting, backoff: &mut Backoff) -> Duration {
        if waiting.is_subscribed() {
            self.inner.fallback
        } else {
            backoff.next_pause()
        }
    }

    /// How long a queue must live for this request's wait.
    fn queue_ttl_ms(&self, request: &AcquireRequest) -> u64 {
        let wait = request
            .wait
            .remaining()
            .unwrap_or(QUEUE_TTL_MAX)
            .min(QUEUE_TTL_MAX);
        millis_ceil(wait) + self.inner.claim_ms + 1000
    }
}

#[cfg(test)]
mod tests {
    use super::QUEUE_TTL_MAX;

    /// prelude.lua gives a queue it rebuilt the longest life a waiter asks
    /// for: its copy of the constant must match.
    #[test]
    fn the_scripts_know_the_longest_queue_life() {
        let prelude = include_str!("../../../lua/prelude.lua");
        let line = format!("local QUEUE_LIFE_MAX_MS = {}\n", QUEUE_TTL_MAX.as_millis());
        assert!(prelude.contains(&line), "prelude.lua lacks {line:?}");
    }
}
