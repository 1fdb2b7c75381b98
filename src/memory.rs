//! The in-memory provider: locks inside one process (Medusa's default).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::error::LockError;
use crate::inspect::{LockHolder, LockInfo, LockState};
use crate::metrics::{self, Wakeup};
use crate::options::DEFAULT_WAIT_TIMEOUT;
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider, Wait};

/// Locks held in this process's memory.
///
/// It gives exactly the contract of the Redis provider (one test suite runs
/// against both), but only within one process: instances of a service
/// running in several processes are **not** excluded from each other. Use the
/// Redis provider as soon as more than one process runs.
///
/// Waiters are woken by the release of the key they wait for, or by the
/// expiry of its lease, never by polling. Fencing tokens come from one
/// counter per provider, so they grow across every key.
///
/// Clones share the same locks.
#[derive(Clone, Debug)]
pub struct InMemoryProvider {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wait_timeout: Duration,
    closed: AtomicBool,
}

// A std mutex, not tokio's: no critical section awaits, and every one is a
// few map operations, so blocking briefly is cheaper than an async lock.
#[derive(Debug, Default)]
struct State {
    locks: HashMap<String, Holder>,
    /// One `Notify` per key that someone waits for; removed when the last
    /// waiter leaves.
    waiters: HashMap<String, Arc<Notify>>,
    /// The last fencing token handed out.
    last_token: u64,
    /// `locks.len()` after the last sweep of expired entries.
    swept_len: usize,
}

#[derive(Debug)]
struct Holder {
    owner: Option<String>,
    expires_at: Option<Instant>,
    /// The newest token handed out with it (re-entries included).
    token: u64,
    /// When it was taken, by this host's clock, and as an instant.
    acquired_at: (SystemTime, Instant),
    metadata: Option<String>,
}

impl Holder {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

enum Attempt {
    Acquired(Acquired),
    Held {
        index: usize,
        expires_at: Option<Instant>,
    },
}

impl InMemoryProvider {
    /// A provider whose `execute` waits 5 s by default.
    pub fn new() -> Self {
        InMemoryProvider::with_wait_timeout(DEFAULT_WAIT_TIMEOUT)
    }

    /// A provider whose `execute` waits `wait_timeout` by default.
    pub fn with_wait_timeout(wait_timeout: Duration) -> Self {
        InMemoryProvider {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wait_timeout,
                closed: AtomicBool::new(false),
            }),
        }
    }
}

/// Diagnostics: for operators, tests and the bench.
impl InMemoryProvider {
    /// The number of locks currently held (expired ones excluded).
    pub fn held(&self) -> usize {
        let now = Instant::now();
        self.state()
            .locks
            .values()
            .filter(|h| h.is_live(now))
            .count()
    }

    /// The number of keys someone waits for right now (each has one entry
    /// in the waiter registry, removed when its last waiter leaves).
    pub fn waiting_keys(&self) -> usize {
        self.state().waiters.len()
    }
}

impl InMemoryProvider {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every critical section is a few infallible map operations).
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> Result<(), LockError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LockError::Shutdown {
                provider: "in-memory".into(),
            });
        }
        Ok(())
    }

    fn attempt(&self, state: &mut State, request: &AcquireRequest) -> Attempt {
        let now = Instant::now();
        let mut reentered = Vec::with_capacity(request.keys.len());
        for (index, key) in request.keys.iter().enumerate() {
            match state.locks.get(key) {
                Some(h) if h.is_live(now) => {
                    if h.owner.is_some() && h.owner == request.owner {
                        reentered.push(true);
                    } else {
                        return Attempt::Held {
                            index,
                            expires_at: h.expires_at,
                        };
                    }
                }
                _ => reentered.push(false),
            }
        }
        let expires_at = request.expire.map(|e| now + e);
        let mut tokens = Vec::with_capacity(request.keys.len());
        let wall = SystemTime::now();
        for (key, re) in request.keys.iter().zip(&reentered) {
            state.last_token += 1;
            let token = state.last_token;
            tokens.push(token);
            if *re {
                if let Some(h) = state.locks.get_mut(key) {
                    h.token = token;
                    if let Some(at) = expires_at {
                        h.expires_at = Some(at);
                        // Its waiters sleep until the lease they saw: a
                        // shorter one must wake them.
                        wake(state, key);
                    }
                }
            } else {
                state.locks.insert(
                    key.clone(),
                    Holder {
                        owner: request.owner.clone(),
                        expires_at,
                        token,
                        acquired_at: (wall, now),
                        metadata: request.metadata.clone(),
                    },
                );
            }
        }
        sweep(state, now);
        Attempt::Acquired(Acquired::new(tokens, reentered, now))
    }

    async fn acquire_inner(&self, request: &AcquireRequest) -> Result<Acquired, LockError> {
        let mut counted = None::<metrics::Waiting>;
        loop {
            self.check_open()?;
            let (registered, expires_at) = {
                let mut state = self.state();
                match self.attempt(&mut state, request) {
                    Attempt::Acquired(a) => return Ok(a),
                    Attempt::Held { index, expires_at } => {
                        let key = &request.keys[index];
                        if request.wait.remaining() == Some(Duration::ZERO) {
                            return Err(request.wait.give_up(key));
                        }
                        let notify = Arc::clone(state.waiters.entry(key.clone()).or_default());
                        let registered = Registered {
                            provider: self,
                            key,
                            notify: Some(notify),
                        };
                        (registered, expires_at)
                    }
                }
            };
            counted.get_or_insert_with(|| metrics::Waiting::start("in-memory"));
            if let Some(cause) = registered.wait(request.wait, expires_at).await {
                metrics::wakeup("in-memory", cause);
            }
            drop(registered);
            if let Wait::Until(at) = request.wait
                && Instant::now() >= at
            {
                // One last attempt: the lock may have been freed exactly
                // at the deadline.
                let mut state = self.state();
                return match self.attempt(&mut state, request) {
                    Attempt::Acquired(a) => Ok(a),
                    Attempt::Held { index, .. } => Err(request.wait.give_up(&request.keys[index])),
                };
            }
        }
    }
}

/// One waiter's interest in a held key. Its entry in the waiter registry
/// goes when the key's last waiter leaves, however the wait ends: a return,
/// or a dropped future.
struct Registered<'a> {
    provider: &'a InMemoryProvider,
    key: &'a str,
    notify: Option<Arc<Notify>>,
}

impl Registered<'_> {
    /// Sleeps until the key's holder changes (a release, a new lease, a
    /// shutdown), its lease as last seen runs out, or the deadline. Returns
    /// what woke it, `None` for the deadline (or a lock already free).
    async fn wait(&self, wait: Wait, expires_at: Option<Instant>) -> Option<Wakeup> {
        let Some(notify) = &self.notify else {
            return None;
        };
        // Register interest before anything else can run: a release between
        // here and the await below is not lost, because `notify_waiters`
        // wakes every `Notified` created before it.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // ...but the release may also have happened between the attempt and
        // `enable`. Re-checking under the lock closes that gap.
        let still_held = {
            let state = self.provider.state();
            state
                .locks
                .get(self.key)
                .is_some_and(|h| h.is_live(Instant::now()))
        };
        if !still_held {
            return None;
        }
        let deadline = match wait {
            Wait::Until(at) => Some(at),
            _ => None,
        };
        let (wake_at, timer) = match (deadline, expires_at) {
            (Some(d), Some(e)) if e < d => (Some(e), Some(Wakeup::Expiry)),
            (Some(d), _) => (Some(d), None),
            (None, e) => (e, Some(Wakeup::Expiry)),
        };
        let span = tracing::trace_span!("lockstep.wait", provider = "in-memory", key = %self.key);
        async {
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => Some(Wakeup::Notification),
                        _ = sleep_until(at) => timer,
                    }
                }
                None => {
                    notified.await;
                    Some(Wakeup::Notification)
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut state = self.provider.state();
        drop(self.notify.take());
        if let Some(n) = state.waiters.get(self.key)
            && Arc::strong_count(n) == 1
        {
            state.waiters.remove(self.key);
        }
    }
}

/// Removes expired entries once the map has doubled since the last sweep, so
/// keys that expire and are never touched again cannot pile up, at an
/// amortised O(1) per acquisition.
fn sweep(state: &mut State, now: Instant) {
    if state.locks.len() >= 2 * state.swept_len.max(512) {
        state.locks.retain(|_, h| h.is_live(now));
        state.swept_len = state.locks.len();
    }
}

/// What inspection reports of `key`.
fn info(state: &State, key: &str, now: Instant) -> LockInfo {
    // Each waiting call holds a clone of the key's Notify; the map one more.
    let waiting = state
        .waiters
        .get(key)
        .map_or(0, |n| Arc::strong_count(n).saturating_sub(1) as u64);
    let lock = match state.locks.get(key) {
        Some(h) if h.is_live(now) => LockState::Held(LockHolder {
            owner: h.owner.clone(),
            fencing_token: h.token,
            acquired_at: h.acquired_at.0,
            held_for: now.saturating_duration_since(h.acquired_at.1),
            lease_left: h.expires_at.map(|at| at.saturating_duration_since(now)),
            metadata: h.metadata.clone(),
        }),
        _ => LockState::Free,
    };
    LockInfo {
        key: key.to_owned(),
        state: lock,
        waiting,
    }
}

/// Wakes the waiters of `key`, if any.
fn wake(state: &State, key: &str) {
    if let Some(n) = state.waiters.get(key) {
        n.notify_waiters();
    }
}

impl Default for InMemoryProvider {
    fn default() -> Self {
        InMemoryProvider::new()
    }
}

impl LockingProvider for InMemoryProvider {
    fn identifier(&self) -> &'static str {
        "in-memory"
    }

    fn default_wait_timeout(&self) -> Duration {
        self.shared.wait_timeout
    }

    fn acquire<'a>(
        &'a self,
        request: &'a AcquireRequest,
    ) -> BoxFuture<'a, Result<Acquired, LockError>> {
        Box::pin(self.acquire_inner(request))
    }

    fn release<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<bool>, LockError>> {
        Box::pin(async move {
            self.check_open()?;
            let now = Instant::now();
            let mut state = self.state();
            let mut released = Vec::with_capacity(keys.len());
            for key in keys {
                let mine = state
                    .locks
                    .get(key)
                    .is_some_and(|h| h.is_live(now) && h.owner.as_deref() == owner);
                if mine {
                    state.locks.remove(key);
                    wake(&state, key);
                }
                released.push(mine);
            }
            Ok(released)
        })
    }

    fn extend<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), LockError>> {
        Box::pin(async move {
            self.check_open()?;
            let now = Instant::now();
            let mut state = self.state();
            for key in keys {
                let mine = state
                    .locks
                    .get(key)
                    .is_some_and(|h| h.is_live(now) && h.owner.as_deref() == owner);
                if !mine {
                    return Err(LockError::NotOwner { key: key.clone() });
                }
            }
            for key in keys {
                if let Some(h) = state.locks.get_mut(key) {
                    h.expires_at = Some(now + lease);
                }
                // Its waiters sleep until the lease they saw: a shorter one
                // must wake them.
                wake(&state, key);
            }
            Ok(())
        })
    }

    fn release_all<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, LockError>> {
        Box::pin(async move {
            self.check_open()?;
            let now = Instant::now();
            let mut state = self.state();
            let mut freed = Vec::new();
            state.locks.retain(|key, h| {
                let live = h.is_live(now);
                let matches = owner.is_none() || h.owner.as_deref() == owner;
                if live && matches {
                    freed.push(key.clone());
                }
                // Expired entries go too: nobody holds them.
                live && !matches
            });
            for key in &freed {
                wake(&state, key);
            }
            Ok(freed.len() as u64)
        })
    }

    fn inspect<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(async move {
            self.check_open()?;
            let state = self.state();
            let now = Instant::now();
            Ok(keys.iter().map(|k| info(&state, k, now)).collect())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(async move {
            self.check_open()?;
            let state = self.state();
            let now = Instant::now();
            Ok(state
                .locks
                .iter()
                .filter(|(k, h)| k.starts_with(prefix) && h.is_live(now))
                .map(|(k, _)| info(&state, k, now))
                .collect())
        })
    }

    fn force_release<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<LockInfo>>, LockError>> {
        Box::pin(async move {
            self.check_open()?;
            let mut state = self.state();
            let now = Instant::now();
            let mut freed = Vec::with_capacity(keys.len());
            for key in keys {
                let found = info(&state, key, now);
                if found.holder().is_some() {
                    // The old holder's next extend finds no lock: NotOwner.
                    state.locks.remove(key);
                    wake(&state, key);
                    freed.push(Some(found));
                } else {
                    freed.push(None);
                }
            }
            Ok(freed)
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.shared.closed.store(true, Ordering::Release);
            let mut state = self.state();
            state.locks.clear();
            for n in state.waiters.values() {
                n.notify_waiters();
            }
        })
    }
}
