//! Acquisition: one attempt (one statement), the guard that undoes an
//! attempt whose outcome is unknown, and the wait loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use deadpool_postgres::Object;
use tokio::time::{Instant, sleep};
use tokio_postgres::types::ToSql;

use super::handoff::{HandoffRequest, Next};
use super::queue::{QueueArgs, Registration};
use super::{Inner, error};
use crate::error::LockError;
use crate::gate::Gate;
use crate::provider::{AcquireRequest, Acquired, Wait};

/// The longest a waiter sleeps without news: covers lost notifications and
/// a LISTEN connection that is down.
const FALLBACK: Duration = Duration::from_secs(1);

/// The least time a waiting call's attempt gets, however close its
/// deadline.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);

/// How long a queue entry lives unless refreshed (each attempt of a
/// waiter refreshes its provider's entry, at least every FALLBACK).
const QUEUE_MS: i64 = 5_000;

/// The pauses between background undo attempts on fresh connections.
const UNDO_PAUSES: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// What one attempt found.
enum Attempt {
    Acquired(Acquired),
    /// The index of the first key held by someone else, and its lease left
    /// (`None`: no expiry).
    Held(usize, Option<Duration>),
}

/// Waits until the call is woken, or `nap` (never past its deadline) has
/// passed. Past its deadline the call gives up, on `request.keys[index]`.
async fn wait_for_news(
    registration: &Registration<'_>,
    request: &AcquireRequest,
    index: usize,
    nap: Duration,
) -> Result<(), LockError> {
    let remaining = request.wait.remaining();
    if remaining == Some(Duration::ZERO) {
        return Err(request.wait.give_up(&request.keys[index]));
    }
    let nap = remaining.map_or(nap, |r| r.min(nap));
    tokio::select! {
        () = registration.waiter.notify.notified() => {}
        () = sleep(nap) => {}
    }
    Ok(())
}

/// The lease of `request` in ms; 0: no expiry.
fn ttl_ms(request: &AcquireRequest) -> i64 {
    request.expire.map_or(0, |d| {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
    })
}

/// A fresh nonce per attempt (and per offer of a hand-off): what its rows
/// are undone by.
pub(super) fn nonce() -> String {
    format!("{:016x}{:016x}", crate::random::u64(), crate::random::u64())
}

impl Inner {
    pub(super) async fn acquire(
        self: &Arc<Self>,
        request: &AcquireRequest,
    ) -> Result<Acquired, LockError> {
        self.check_open()?;
        if request.wait == Wait::Once {
            return match self.attempt(request, None).await? {
                Attempt::Acquired(a) => {
                    self.took_locks(request, &a);
                    Ok(a)
                }
                Attempt::Held(index, _) => Err(request.wait.give_up(&request.keys[index])),
            };
        }
        // The call joins its keys' local queues before its first attempt,
        // so that a reservation announced in between finds it.
        let ttl_ms = ttl_ms(request);
        let (mut registration, pending) = self.register(
            &request.keys,
            HandoffRequest {
                owner: request.owner.clone(),
                ttl_ms,
                metadata: request.metadata.clone(),
            },
        );
        for w in pending {
            w.finished(self.client_timeout()).await;
        }
        let mut failures = 0u32;
        // Since when a multi-key call has found its gate closed.
        let mut blocked_since: Option<Instant> = None;
        loop {
            self.check_open()?;
            let mut next = registration.waiter.next();
            if matches!(next, Next::Attempt) && !registration.may_attempt() {
                // Another local call is first for the key: this one waits
                // its turn (as on Redis), so that it cannot take a lock
                // freed while the first one's attempt is on its way.
                registration.waiter.attempted();
                next = Next::Wait;
            }
            if matches!(next, Next::Attempt) && request.keys.len() > 1 {
                // Another call here has one of the keys: woken when it
                // lets go, not retried into a statement bound to fail;
                // attempted anyway after FALLBACK (the mark is advisory).
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() < FALLBACK
                    && let Gate::Closed(index, until) = registration.enter(request.owner.as_deref())
                {
                    registration.waiter.attempted();
                    let mut nap = FALLBACK.saturating_sub(since.elapsed());
                    if let Some(until) = until {
                        nap = nap.min(until.saturating_duration_since(Instant::now()));
                    }
                    wait_for_news(&registration, request, index, nap).await?;
                    continue;
                }
                blocked_since = None;
            }
            match next {
                Next::Granted(a, more) => {
                    self.took_locks(request, &a);
                    registration.took_grant(more);
                    return Ok(a);
                }
                Next::Wait => {
                    // A release is handing this call the lock, or undoing
                    // an offer whose outcome it does not know, or it is
                    // another call's turn: woken when that changes.
                    wait_for_news(&registration, request, 0, FALLBACK).await?;
                    continue;
                }
                Next::Attempt => {}
            }
            let args = registration.queue_args(self.listening.load(Ordering::Acquire));
            let outcome = self.attempt(request, Some(args)).await;
            registration.waiter.attempted();
            let acquired = if let Ok(Attempt::Acquired(a)) = &outcome {
                self.took_locks(request, a);
                true
            } else {
                false
            };
            registration.end_attempt(acquired);
            let nap = match outcome {
                Ok(Attempt::Acquired(a)) => {
                    registration.took(args);
                    return Ok(a);
                }
                Ok(Attempt::Held(index, lease_left)) => {
                    failures = 0;
                    let mut nap = FALLBACK;
                    if let Some(left) = lease_left {
                        nap = nap.min(left + Duration::from_millis(1));
                    }
                    // Woken when it is this call's turn (a reservation for
                    // the provider, passed to its first local waiter), or
                    // told to retry.
                    wait_for_news(&registration, request, index, nap).await?;
                    continue;
                }
                Err(e) if e.is_transient() => {
                    // Waiting acquisitions ride out transient failures
                    // until their deadline.
                    let remaining = request.wait.remaining();
                    if remaining == Some(Duration::ZERO) {
                        return Err(e);
                    }
                    failures += 1;
                    let pause = Duration::from_millis(50 * u64::from(failures.min(10)));
                    remaining.map_or(pause, |r| r.min(pause))
                }
                Err(e) => return Err(e),
            };
            sleep(nap).await;
        }
    }

    /// Marks the keys of a successful acquisition as held here (`queue.rs`).
    fn took_locks(&self, request: &AcquireRequest, acquired: &Acquired) {
        let until = request.expire.map(|d| acquired.sent_at + d);
        self.mark_held(&request.keys, request.owner.as_deref(), until);
    }

    /// One attempt, with a nonce of its own. Whatever happens to the future,
    /// an attempt that may have taken effect without a reply is undone.
    ///
    /// `queue`: how the attempt takes part in the wait queue (`None`: a
    /// single attempt, which never queues).
    async fn attempt(
        self: &Arc<Self>,
        request: &AcquireRequest,
        queue: Option<QueueArgs>,
    ) -> Result<Attempt, LockError> {
        const OP: &str = "acquire";
        let client = self.client(OP).await?;
        let statement = client
            .prepare_cached(&self.sql.acquire)
            .await
            .map_err(|e| error::prepare(OP, e))?;
        let ttl_ms = ttl_ms(request);
        let nonce = nonce();
        let mut undo = Undo {
            inner: Arc::clone(self),
            client: Some(client),
            keys: request.keys.clone(),
            owner: request.owner.clone(),
            nonce,
            armed: true,
        };
        // A waiting call's attempt is bounded by its deadline too (not
        // tighter than MIN_ATTEMPT, so that a last attempt can succeed).
        let (bound, by_deadline) = match request.wait {
            Wait::Until(_) => {
                let left = request
                    .wait
                    .remaining()
                    .unwrap_or_default()
                    .max(MIN_ATTEMPT);
                if left < self.client_timeout() {
                    (left, true)
                } else {
                    (self.client_timeout(), false)
                }
            }
            _ => (self.client_timeout(), false),
        };
        let sent_at = Instant::now();
        let result = {
            let client = undo.client.as_ref().expect("set above");
            let pid = queue.map(|_| self.pid.as_str());
            let q = queue.unwrap_or(QueueArgs {
                handoff: false,
                queue: false,
                claim: false,
                more: false,
            });
            let params: [&(dyn ToSql + Sync); 11] = [
                &request.keys,
                &request.owner,
                &undo.nonce,
                &ttl_ms,
                &request.metadata,
                &pid,
                &q.handoff,
                &q.queue,
                &q.claim,
                &q.more,
                &QUEUE_MS,
            ];
            self.sent();
            tokio::time::timeout(bound, client.query(&statement, &params)).await
        };
        let rows = match result {
            // The wait's deadline came first (the statement is blocked on
            // the server, behind another call's advisory lock): the server
            // is asked to cancel it, and the guard undoes whatever it did,
            // on the same connection, behind it.
            Err(_) if by_deadline => {
                if let Some(client) = undo.client.as_ref() {
                    let cancel = client.cancel_token();
                    tokio::spawn(async move {
                        let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
                    });
                }
                return Err(request.wait.give_up(&request.keys[0]));
            }
            // The guard undoes it when dropped below.
            Err(_) => return Err(error::timed_out(OP, self.client_timeout())),
            Ok(Err(e)) => {
                let e = error::statement(OP, e);
                // A server's error rolled the statement back.
                undo.armed = e.is_outcome_unknown();
                return Err(e);
            }
            Ok(Ok(rows)) => {
                undo.armed = false;
                rows
            }
        };
        let parse = || -> Result<Attempt, tokio_postgres::Error> {
            if let [row] = rows.as_slice()
                && row.try_get::<_, Option<i64>>(1)?.is_none()
            {
                let index: i32 = row.try_get(0)?;
                let lease_ms: Option<i64> = row.try_get(3)?;
                return Ok(Attempt::Held(
                    usize::try_from(index).unwrap_or(0),
                    lease_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
                ));
            }
            let mut tokens = Vec::with_capacity(rows.len());
            let mut reentered = Vec::with_capacity(rows.len());
            for row in &rows {
                let token: Option<i64> = row.try_get(1)?;
                tokens.push(u64::try_from(token.unwrap_or(0)).unwrap_or(0));
                reentered.push(row.try_get::<_, Option<bool>>(2)?.unwrap_or(false));
            }
            Ok(Attempt::Acquired(Acquired::new(tokens, reentered, sent_at)))
        };
        match parse() {
            Ok(Attempt::Acquired(a)) if a.tokens.len() != request.keys.len() => Err(
                error::unexpected(OP, "acquire returned the wrong number of rows"),
            ),
            Ok(a) => Ok(a),
            Err(e) => Err(error::unexpected(OP, e.to_string())),
        }
    }

    /// Undoes the attempt `nonce`: first on its own connection (queued
    /// after the attempt, so it runs once that has committed), then on
    /// fresh connections with pauses. When it could not run on the same
    /// connection, it is repeated once more after a second: the attempt's
    /// backend may still have been running it.
    pub(super) async fn undo(
        self: &Arc<Self>,
        client: Option<Object>,
        keys: &[String],
        owner: Option<&str>,
        nonce: &str,
    ) {
        if let Some(client) = client {
            let done = async {
                let statement = client.prepare_cached(&self.sql.release).await.ok()?;
                let claim_ms = self.claim_ms();
                let none: Option<&str> = None;
                let params: [&(dyn ToSql + Sync); 10] = [
                    &keys,
                    &owner,
                    &nonce,
                    &self.pid,
                    &claim_ms,
                    &none,
                    &none,
                    &None::<i64>,
                    &none,
                    &false,
                ];
                self.sent();
                tokio::time::timeout(self.client_timeout(), client.query(&statement, &params))
                    .await
                    .ok()?
                    .ok()
            }
            .await;
            if let Some(rows) = done {
                self.released(keys, &rows);
                return;
            }
            // Broken or stuck: never back into the pool.
            drop(Object::take(client));
        }
        let mut undone = false;
        for pause in UNDO_PAUSES {
            sleep(pause).await;
            match self.release(keys, owner, nonce).await {
                Ok(_) => {
                    undone = true;
                    break;
                }
                Err(LockError::Shutdown { .. }) => break,
                Err(e) => tracing::debug!(error = %e, "lockstep postgres: undo failed, retrying"),
            }
        }
        if undone {
            sleep(FALLBACK).await;
            let _ = self.release(keys, owner, nonce).await;
        } else {
            tracing::warn!(
                ?keys,
                "lockstep postgres: could not undo an acquisition whose outcome is unknown; \
                 its leases (if any) will run out"
            );
        }
    }
}

/// Undoes an attempt in the background unless disarmed: its outcome was
/// unknown, or its future was dropped while the statement may have been
/// sent. Holds the attempt's pooled connection, so the undo is queued on
/// it behind the attempt.
struct Undo {
    inner: Arc<Inner>,
    client: Option<Object>,
    keys: Vec<String>,
    owner: Option<String>,
    nonce: String,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(keys = ?self.keys, "lockstep postgres: no runtime to undo an acquisition");
            return;
        };
        let pending = self.inner.pending();
        let client = self.client.take();
        let keys = std::mem::take(&mut self.keys);
        let owner = self.owner.take();
        let nonce = std::mem::take(&mut self.nonce);
        let inner = Arc::clone(&self.inner);
        runtime.spawn(async move {
            inner.undo(client, &keys, owner.as_deref(), &nonce).await;
            drop(pending);
        });
    }
}
