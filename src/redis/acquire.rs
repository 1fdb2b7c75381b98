//! Acquisition on Redis: one attempt (`acquire.lua`), the ways of waiting
//! (once, polling, queued for a handoff, woken), replica acknowledgement,
//! and the guards that keep a failed or cancelled acquisition from leaving
//! anything behind.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::{Instant, sleep};
use tracing::Instrument;

use super::waiting::{Left, Waiter, Waiting};
use super::{RedisProvider, scripts, unexpected};
use crate::error::LockError;
use crate::options::millis_ceil;
use crate::provider::{AcquireRequest, Acquired, Wait};
use crate::token::{nonce, unit_random};

/// A decoded reply of `acquire.lua`.
pub(super) enum AcquireReply {
    Acquired {
        tokens: Vec<u64>,
        reentered: Vec<bool>,
    },
    Held {
        index: usize,
        pttl: i64,
    },
    Foreign {
        index: usize,
    },
}

/// The Redis keys of one request: the lock keys, then their fencing
/// counters and wait queues, then the owner's index if it has one.
pub(super) struct Keyset {
    pub(super) n: usize,
    pub(super) all: Vec<String>,
    pub(super) index: Option<String>,
    /// Set when an attempt got no reply: it may have taken the locks.
    pub(super) uncertain: std::sync::atomic::AtomicBool,
    /// On a cluster: the request split by hash slot, in slot order.
    #[cfg(feature = "cluster")]
    pub(super) groups: Vec<super::cluster::Group>,
}

impl Keyset {
    pub(super) fn locks(&self) -> &[String] {
        &self.all[..self.n]
    }
}

/// How an attempt asks to be queued if it finds a lock held.
pub(super) struct Queueing<'a> {
    pid: &'a str,
    entry: &'a str,
    more: bool,
    queue_ttl_ms: u64,
}

pub(super) const NO_QUEUE: Queueing<'static> = Queueing {
    pid: "",
    entry: "",
    more: false,
    queue_ttl_ms: 0,
};

/// Whether a waiting acquisition should try again after `e`: a backend
/// failure that may pass (no connection, no reply, replicas not caught up,
/// as during a failover), with time left before the deadline. An attempt
/// without a reply may have taken the locks; a later attempt with the same
/// nonce finds them its own.
pub(super) fn keep_trying(request: &AcquireRequest, e: &LockError) -> bool {
    e.is_transient() && request.wait.remaining() != Some(Duration::ZERO)
}

pub(super) fn wait_span(key: &str) -> tracing::Span {
    tracing::trace_span!("lockstep.wait", provider = "locking-redis", key = %key)
}

pub(super) fn foreign(request: &AcquireRequest, index: usize) -> LockError {
    let key = request.keys.get(index).unwrap_or(&request.keys[0]);
    LockError::ForeignValue { key: key.clone() }
}

/// Keeps a single-key waiter's local registration honest however its call
/// ends: on drop (return, error, or a dropped future) it leaves the local
/// queue, and withdraws the process's Redis queue entry when it was the
/// last local waiter.
pub(super) struct LocalGuard<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    waiter: &'a Arc<Waiter>,
    key: Option<String>,
}

impl LocalGuard<'_> {
    /// Leaves the local queue now. `acquired`: the call holds the lock, so
    /// the process's queue entry was already dealt with by the script.
    pub(super) fn finish(&mut self, acquired: bool) {
        if acquired {
            if let Some(key) = self.key.take() {
                self.waiting.leave_single(&key, self.waiter);
            }
        } else {
            self.leave();
        }
    }

    /// Leaves the local queue, withdrawing from Redis if it was the last
    /// local waiter.
    fn leave(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        if self.waiting.leave_single(&key, self.waiter) == Left::Last {
            self.provider.withdraw_later(key, false);
        }
    }
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            if self.waiting.mark_gone(self.waiter).is_some() {
                // Handed the lock after the call had decided to give up:
                // nobody will use it.
                self.provider.undo_later(
                    vec![key.clone()],
                    self.waiter.owner.clone(),
                    self.waiter.nonce.clone(),
                    None,
                );
            }
            self.leave();
        }
    }
}

/// The same for a waiter that waits to be woken (multi-key or barging): it
/// is registered for all its keys, and queued in Redis on those it found
/// held (`enqueued`, indices into `keys`).
pub(super) struct WokenGuard<'a> {
    provider: &'a RedisProvider,
    waiting: &'a Arc<Waiting>,
    waiter: &'a Arc<Waiter>,
    keys: &'a [String],
    enqueued: Vec<usize>,
}

impl Drop for WokenGuard<'_> {
    fn drop(&mut self) {
        for (i, key) in self.keys.iter().enumerate() {
            let last = self.waiting.leave_other(key, self.waiter) == Left::Last;
            if last && self.enqueued.contains(&i) {
                self.provider.withdraw_later(key.clone(), true);
            }
        }
    }
}

/// Undoes an acquisition whose reply never arrived, when dropped armed: on
/// an "outcome unknown" error, and when the caller's future is dropped
/// mid-call. Releases only what this acquisition took (matched by its
/// nonce), in a background task that retries until it succeeds, the lease
/// would have ended anyway, or the provider shuts down.
pub(super) struct UndoGuard<'a> {
    provider: &'a RedisProvider,
    keys: &'a [String],
    owner: &'a str,
    nonce: &'a str,
    expire: Option<Duration>,
    armed: bool,
}

impl UndoGuard<'_> {
    pub(super) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for UndoGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.provider.undo_later(
                self.keys.to_vec(),
                self.owner.to_owned(),
                self.nonce.to_owned(),
                self.expire,
            );
        }
    }
}

pub(super) fn decode_acquire(reply: Value, n: usize) -> Result<AcquireReply, LockError> {
    let bad = |what: &str| unexpected("acquire", what);
    let Value::Array(items) = reply else {
        return Err(bad("not an array"));
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
            // Indices past the lock keys name internal keys; report the first
            // lock key then, the one the caller can act on.
            let index = index.max(1) as usize - 1;
            Ok(AcquireReply::Foreign {
                index: if index < n { index } else { 0 },
            })
        }
        _ => Err(bad("unknown status")),
    }
}

/// The first pause before retrying a contended lock, when polling.
pub(super) const RETRY_MIN: Duration = Duration::from_millis(5);

/// The longest pause between retries of a contended lock, when polling.
pub(super) const RETRY_MAX: Duration = Duration::from_millis(100);

/// The longest a wait queue is kept alive by one waiter without news.
pub(super) const QUEUE_TTL_MAX: Duration = Duration::from_secs(3600);

impl RedisProvider {
    pub(super) fn keyset(&self, request: &AcquireRequest) -> Keyset {
        let layout = &self.inner.layout;
        let locks: Vec<String> = request.keys.iter().map(|k| layout.lock_key(k)).collect();
        let owner = request.owner.as_deref().filter(|_| request.indexed);
        #[cfg(feature = "cluster")]
        if self.is_cluster() {
            let groups = self
                .slot_groups(&locks)
                .into_iter()
                .map(|(slot, positions)| super::cluster::Group {
                    slot,
                    keys: self.keyset_of(
                        positions.iter().map(|&p| locks[p].clone()).collect(),
                        owner.map(|o| layout.slot_owner_index(o, slot)),
                    ),
                    positions,
                })
                .collect();
            let mut keys = self.keyset_of(locks, None);
            keys.groups = groups;
            // One slot: its index is the request's (a waiter handed a lock
            // is indexed in it).
            if let [only] = keys.groups.as_slice() {
                keys.index = only.keys.index.clone();
            }
            return keys;
        }
        self.keyset_of(locks, owner.map(|o| layout.owner_index(o)))
    }

    /// The keys of `acquire.lua` for these lock keys and owner's index.
    fn keyset_of(&self, locks: Vec<String>, index: Option<String>) -> Keyset {
        let layout = &self.inner.layout;
        let n = locks.len();
        let mut all = locks;
        for i in 0..n {
            let fence = layout.fence_key_of(&all[i]);
            all.push(fence);
        }
        for i in 0..n {
            let queue = layout.queue_key(&all[i]);
            all.push(queue);
        }
        if let Some(index) = &index {
            all.push(index.clone());
        }
        Keyset {
            n,
            all,
            index,
            uncertain: std::sync::atomic::AtomicBool::new(false),
            #[cfg(feature = "cluster")]
            groups: Vec::new(),
        }
    }

    /// One run of `acquire.lua`.
    pub(super) async fn attempt(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
        queueing: &Queueing<'_>,
    ) -> Result<AcquireReply, LockError> {
        let owner = request.owner.as_deref().unwrap_or("");
        let ttl = request.expire.map_or(0, millis_ceil).to_string();
        let args = [
            keys.n.to_string(),
            owner.to_owned(),
            nonce.to_owned(),
            ttl,
            queueing.pid.to_owned(),
            queueing.entry.to_owned(),
            if self.inner.fair { "1" } else { "0" }.to_owned(),
            queueing.queue_ttl_ms.to_string(),
            self.inner.claim_ms.to_string(),
            self.channel_prefix_for(&keys.all[0]).into_owned(),
            if queueing.more { "1" } else { "0" }.to_owned(),
            // Set per request on a cluster (see attempt_grouped).
            "0".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        #[cfg(feature = "cluster")]
        if !keys.groups.is_empty() {
            return self.attempt_grouped(keys, &args, owner, nonce).await;
        }
        let reply = if self.inner.replicas.0 > 0 {
            self.acquire_replicated(keys, &args, owner, nonce, request.expire)
                .await
        } else {
            self.eval("acquire", &scripts::ACQUIRE, &keys.all, &args)
                .await
        };
        if reply.as_ref().is_err_and(LockError::is_outcome_unknown) {
            keys.uncertain
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        decode_acquire(reply?, keys.n)
    }

    /// `acquire.lua`, then `WAIT` for the replicas on the same connection;
    /// an acquisition they did not all acknowledge is released again.
    pub(super) async fn acquire_replicated(
        &self,
        keys: &Keyset,
        args: &[&str],
        owner: &str,
        nonce: &str,
        expire: Option<Duration>,
    ) -> Result<Value, LockError> {
        let (required, wait) = self.inner.replicas;
        let limit = self.inner.response_timeout + wait;
        let (reply, acked) = self
            .inner
            .conns
            .run_exclusive("acquire", limit, |mut conn| async move {
                let mut invocation = scripts::ACQUIRE.prepare_invoke();
                for k in &keys.all {
                    invocation.key(k);
                }
                for a in args {
                    invocation.arg(*a);
                }
                let reply = invocation.invoke_async::<Value>(&mut conn).await?;
                let granted =
                    matches!(&reply, Value::Array(items) if items.first() == Some(&Value::Int(1)));
                if !granted {
                    return Ok((reply, None));
                }
                let acked: i64 = redis::cmd("WAIT")
                    .arg(required)
                    .arg(wait.as_millis() as u64)
                    .query_async(&mut conn)
                    .await?;
                Ok((reply, Some(acked)))
            })
            .await?;
        match acked {
            Some(acked) if (acked as usize) < required => {
                // Not durable enough: give back what this acquisition took.
                if let Err(e) = self.release_keys(keys.locks(), owner, nonce, None).await {
                    self.undo_later(
                        keys.locks().to_vec(),
                        owner.to_owned(),
                        nonce.to_owned(),
                        expire,
                    );
                    tracing::debug!(
                        "releasing an unreplicated acquisition failed, retrying in the background: {e}"
                    );
                }
                Err(super::not_replicated(acked, required, wait))
            }
            _ => Ok(reply),
        }
    }

    pub(super) async fn acquire_inner(
        &self,
        request: &AcquireRequest,
    ) -> Result<Acquired, LockError> {
        self.check_open()?;
        let keys = self.keyset(request);
        let nonce = nonce();
        // Any attempt may have taken the locks without our hearing of it
        // (a lost reply, a dropped future): undo by this call's nonce
        // unless the call ends with an answer.
        let undo = UndoGuard {
            provider: self,
            keys: keys.locks(),
            owner: request.owner.as_deref().unwrap_or(""),
            nonce: &nonce,
            expire: request.expire,
            armed: true,
        };
        // On a cluster, a waiting call listens in its keys' slots before
        // its first attempt (see shards.rs).
        #[cfg(feature = "cluster")]
        let _joined = match (&self.inner.waiting, request.wait) {
            (Some(_), Wait::Until(_) | Wait::Forever) => self.join_slots(&keys, request.wait).await,
            _ => None,
        };
        let result = match (&self.inner.waiting, request.wait) {
            (_, Wait::Once) => self.acquire_once(request, &keys, &nonce).await,
            (Some(w), _) if keys.n == 1 && self.inner.fair => {
                self.acquire_queued(w, request, &keys, &nonce).await
            }
            (Some(w), _) => self.acquire_woken(w, request, &keys, &nonce).await,
            (None, _) => self.acquire_polling(request, &keys, &nonce).await,
        };
        // An attempt without a reply may have taken the locks: unless this
        // call ends holding them, `undo` releases them (by nonce) on drop.
        if result.is_ok() || !keys.uncertain.load(std::sync::atomic::Ordering::Relaxed) {
            undo.disarm();
        }
        result
    }

    /// One attempt with the caller's nonce, on one master of a Redlock set:
    /// `Err(index)` of a key found held. No undo: the set releases by this nonce on
    /// every master when the quorum is not reached.
    #[cfg(feature = "redlock")]
    pub(crate) async fn try_with_nonce(
        &self,
        request: &AcquireRequest,
        nonce: &str,
    ) -> Result<Result<Acquired, usize>, LockError> {
        self.check_open()?;
        let keys = self.keyset(request);
        let sent_at = Instant::now();
        match self.attempt(request, &keys, nonce, &NO_QUEUE).await? {
            AcquireReply::Acquired { tokens, reentered } => {
                Ok(Ok(Acquired::new(tokens, reentered, sent_at)))
            }
            AcquireReply::Held { index, .. } => Ok(Err(index)),
            AcquireReply::Foreign { index } => Err(foreign(request, index)),
        }
    }

    /// A single attempt; never queues (and, when fair, never takes a lock
    /// another process is queued for).
    pub(super) async fn acquire_once(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let sent_at = Instant::now();
        match self.attempt(request, keys, nonce, &NO_QUEUE).await? {
            AcquireReply::Acquired { tokens, reentered } => {
                Ok(Acquired::new(tokens, reentered, sent_at))
            }
            AcquireReply::Held { index, .. } => Err(request.wait.give_up(&request.keys[index])),
            AcquireReply::Foreign { index } => Err(foreign(request, index)),
        }
    }

    /// Waiting without notifications: jittered exponential backoff, never
    /// past the holder's lease nor past the deadline.
    pub(super) async fn acquire_polling(
        &self,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let mut pause = RETRY_MIN;
        let mut span = None::<tracing::Span>;
        loop {
            let sent_at = Instant::now();
            let (index, pttl) = match self.attempt(request, keys, nonce, &NO_QUEUE).await {
                Ok(AcquireReply::Acquired { tokens, reentered }) => {
                    return Ok(Acquired::new(tokens, reentered, sent_at));
                }
                Ok(AcquireReply::Foreign { index }) => return Err(foreign(request, index)),
                Ok(AcquireReply::Held { index, pttl }) => (index, pttl),
                Err(e) if keep_trying(request, &e) => (0, RETRY_MAX.as_millis() as i64),
                Err(e) => return Err(e),
            };
            let key = &request.keys[index];
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(request.wait.give_up(key));
            }
            let mut nap = pause.mul_f64(0.5 + 0.5 * unit_random());
            if pttl > 0 {
                nap = nap.min(Duration::from_millis(pttl as u64 + 1));
            }
            if let Some(r) = remaining {
                nap = nap.min(r);
            }
            pause = (pause * 2).min(RETRY_MAX);
            let span = span.get_or_insert_with(|| wait_span(key));
            sleep(nap).instrument(span.clone()).await;
            self.check_open()?;
        }
    }

    /// A single-key, fair wait: this process queues once in Redis; local
    /// waiters queue behind each other and are handed the lock in order.
    pub(super) async fn acquire_queued(
        &self,
        waiting: &Arc<Waiting>,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let key = &keys.locks()[0];
        let owner = request.owner.as_deref().unwrap_or("");
        let ttl_ms = request.expire.map_or(0, millis_ceil);
        let waiter = Waiter::new(owner, nonce, ttl_ms, keys.index.clone());
        let mut guard = LocalGuard {
            provider: self,
            waiting,
            waiter: &waiter,
            key: Some(key.clone()),
        };
        let span = wait_span(&request.keys[0]);
        let mut attempt_now = waiting.join_single(key, &waiter);
        let mut holder_expiry = None::<Instant>;
        let mut pause = RETRY_MIN;
        let mut last_error = None::<LockError>;
        loop {
            if let Some((token, sent_at)) = waiter.granted() {
                guard.finish(waiting.mark_gone(&waiter).is_some());
                return Ok(Acquired::new(vec![token], vec![false], sent_at));
            }
            if attempt_now && waiter.begin_attempt() {
                let queueing = Queueing {
                    pid: &waiting.pid,
                    entry: &waiting.pid,
                    more: waiting.others_waiting(key, &waiter),
                    queue_ttl_ms: self.queue_ttl_ms(request),
                };
                let sent_at = Instant::now();
                let reply = self.attempt(request, keys, nonce, &queueing).await;
                waiter.end_attempt();
                match reply {
                    Ok(AcquireReply::Acquired { tokens, reentered }) => {
                        waiting.mark_gone(&waiter);
                        guard.finish(true);
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
                        holder_expiry = Some(Instant::now() + self.retry_pause(&mut pause));
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if let Wait::Until(deadline) = request.wait
                && now >= deadline
            {
                if waiter.is_being_handed() {
                    // A release is handing us the lock: take its answer.
                    waiter
                        .sleep_until(now + 2 * self.inner.response_timeout)
                        .await;
                    attempt_now = false;
                    continue;
                }
                if waiter.granted().is_some() {
                    continue;
                }
                // Out of time while Redis was away: say so.
                return Err(last_error
                    .take()
                    .unwrap_or_else(|| request.wait.give_up(&request.keys[0])));
            }
            let fallback = self.quiet_period(waiting, &mut pause);
            let mut until = now + fallback;
            if let Some(at) = holder_expiry.filter(|_| waiting.is_first(key, &waiter)) {
                until = until.min(at);
            }
            if let Wait::Until(deadline) = request.wait {
                until = until.min(deadline);
            }
            waiter.sleep_until(until).instrument(span.clone()).await;
            waiter.take_woken();
            self.check_open()?;
            // Only the first local waiter speaks for the process; the
            // others wait for their turn or for a release to hand them
            // the lock.
            attempt_now = waiting.is_first(key, &waiter);
        }
    }

    /// Waiting to be woken: multi-key requests, and every request when
    /// barging. Each wake-up is a new attempt.
    pub(super) async fn acquire_woken(
        &self,
        waiting: &Arc<Waiting>,
        request: &AcquireRequest,
        keys: &Keyset,
        nonce: &str,
    ) -> Result<Acquired, LockError> {
        let owner = request.owner.as_deref().unwrap_or("");
        let waiter = Waiter::new(owner, nonce, 0, None);
        // Registered for every key before the first attempt: a release can
        // be published before the reply that says which key was held
        // reaches us, and must not find nobody to wake.
        for key in keys.locks() {
            waiting.join_other(key, &waiter);
        }
        let mut guard = WokenGuard {
            provider: self,
            waiting,
            waiter: &waiter,
            keys: keys.locks(),
            enqueued: Vec::new(),
        };
        let entry = format!("~{}", waiting.pid);
        let mut span = None::<tracing::Span>;
        let mut pause = RETRY_MIN;
        loop {
            let queueing = Queueing {
                pid: &waiting.pid,
                entry: &entry,
                more: false,
                queue_ttl_ms: self.queue_ttl_ms(request),
            };
            let sent_at = Instant::now();
            let (index, pttl) = match self.attempt(request, keys, nonce, &queueing).await {
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
                Err(e) if keep_trying(request, &e) => {
                    (0, self.retry_pause(&mut pause).as_millis() as i64)
                }
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(request.wait.give_up(&request.keys[index]));
            }
            let fallback = self.quiet_period(waiting, &mut pause);
            let mut until = now + fallback;
            if pttl > 0 {
                until = until.min(now + Duration::from_millis(pttl as u64 + 1));
            }
            if let Some(r) = remaining {
                until = until.min(now + r);
            }
            let span = span.get_or_insert_with(|| wait_span(&request.keys[index]));
            waiter.sleep_until(until).instrument(span.clone()).await;
            waiter.take_woken();
            self.check_open()?;
        }
    }

    /// How long a waiter sleeps without news: the fallback period while
    /// notifications arrive, a jittered backoff (`pause`) while they cannot.
    pub(super) fn quiet_period(&self, waiting: &Waiting, pause: &mut Duration) -> Duration {
        if waiting.is_subscribed() {
            self.inner.fallback
        } else {
            *pause = (*pause * 2).min(RETRY_MAX);
            pause.mul_f64(0.5 + 0.5 * unit_random())
        }
    }

    /// A jittered backoff (`pause`), for attempts while Redis is away.
    pub(super) fn retry_pause(&self, pause: &mut Duration) -> Duration {
        *pause = (*pause * 2).min(RETRY_MAX);
        pause.mul_f64(0.5 + 0.5 * unit_random())
    }

    /// How long a queue must live for this request's wait.
    pub(super) fn queue_ttl_ms(&self, request: &AcquireRequest) -> u64 {
        let wait = request
            .wait
            .remaining()
            .unwrap_or(QUEUE_TTL_MAX)
            .min(QUEUE_TTL_MAX);
        millis_ceil(wait) + self.inner.claim_ms + 1000
    }
}
