//! The Redlock provider: one lock across N independent Redis masters,
//! held when a majority has it (feature `redlock`, opt-in).

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::{Instant, sleep};

use crate::backoff::Backoff;
use crate::error::{BackendError, BackendErrorKind, ConfigError, LockError};
use crate::inspect::{LockHolder, LockInfo, LockState};
use crate::provider::{AcquireRequest, Acquired, BoxFuture, LockingProvider, Wait};
use crate::redis::connect;
use crate::redis::wire::nonce;
use crate::redis::{RedisConfig, RedisProvider};

/// How much of a lease is set aside for clock drift between the client
/// and the masters (Redlock's usual 1 %), plus 2 ms.
const DRIFT_FACTOR: f64 = 0.01;

/// The first and the longest pause between two rounds of attempts.
const RETRY: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));

/// Locks held by a majority of N independent Redis masters (Redlock).
///
/// Every operation goes to all masters at once. An acquisition holds as
/// soon as `N/2 + 1` masters took every key, within the lease less the time
/// it took and a drift allowance (1 % + 2 ms); the calls still under way
/// then finish in the background, so the lock reaches every master that
/// answers. Otherwise, once every master answered, what it took anywhere is
/// released (on every master, by this attempt's nonce) and it tries again
/// until its deadline. Releases go to every master. The contract is the provider contract, as
/// long as a majority answers.
///
/// What it does not give (see `docs/failover.md` in the repository):
/// - Safety rests on timing: a holder paused past its lease, or a master
///   whose clock jumps, can make two holders. Restarting a master without
///   persistence forgets its locks; restart it only after the longest lease
///   (delayed restart), or persist with fsync.
/// - **Fencing tokens** are the highest token of the majority. Each master's
///   token is floored by its clock (microseconds), so they grow across
///   acquisitions as long as the masters' clocks agree to within the time
///   between two acquisitions; they are not the consensus-grade tokens a
///   single master's counter gives. Use a single Redis with
///   [`RedisConfig::wait_for_replicas`] where the fencing order must be
///   exact.
/// - Waiters poll (jittered backoff, 10-200 ms): there is no cross-master
///   notification.
#[derive(Clone, Debug)]
pub struct RedlockProvider {
    masters: Vec<RedisProvider>,
    quorum: usize,
    wait_timeout: Duration,
}

/// The answers of the masters to one operation.
struct Tally<T> {
    ok: Vec<T>,
    refused: Vec<T>,
    errors: Vec<LockError>,
}

impl RedlockProvider {
    /// Connects to the masters at `urls` (at least 3, independent: not
    /// replicas of each other), with every other setting from `config`
    /// (namespace, timeouts). Starts when a majority answers; the others are
    /// reached on later calls.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSetting`] for fewer than 3 URLs, the errors of
    /// [`RedisProvider::connect`] for a bad URL or setting, and
    /// [`ConfigError::Unreachable`] when no majority answers within the
    /// connect timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: connecting takes no lock, and a dropped future closes
    /// the connections it opened (`tests/redlock.rs` drops it at every
    /// poll).
    pub async fn connect(urls: &[&str], config: RedisConfig) -> Result<Self, ConfigError> {
        if urls.len() < 3 {
            return Err(ConfigError::InvalidSetting {
                name: "urls",
                reason: format!(
                    "Redlock needs at least 3 independent masters, not {}",
                    urls.len()
                ),
            });
        }
        let masters = urls
            .iter()
            .map(|url| {
                // Connected on first use, without notifications (waiters
                // poll): a set must start while some masters are down.
                let config = RedisConfig {
                    url: Some((*url).to_owned()),
                    ..config.clone()
                };
                connect::single(&config, false).map(|(master, _)| master)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let provider = RedlockProvider {
            quorum: masters.len() / 2 + 1,
            masters,
            wait_timeout: config.wait_timeout,
        };
        let answered = provider
            .fan_out(
                |m| Box::pin(async move { m.ping().await.map(|()| true) }),
                |t| t.ok.len() >= provider.quorum,
            )
            .await;
        if answered.ok.len() < provider.quorum {
            return Err(ConfigError::Unreachable {
                url: format!("{} Redlock masters", provider.masters.len()),
                timeout: config.connect_timeout,
                reason: format!(
                    "only {} of {} answered",
                    answered.ok.len(),
                    provider.masters.len()
                ),
                source: None,
            });
        }
        Ok(provider)
    }

    /// How many masters must agree.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// Runs `op` on every master at once; returns as soon as `decided` says
    /// the outcome is certain. The calls still under way then finish in the
    /// background: a lock on every master survives more failures than one
    /// on a bare majority (and a call dropped half-way, after a `NOSCRIPT`,
    /// would never reach its master at all).
    async fn fan_out<T: Verdict + Send + 'static>(
        &self,
        op: impl Fn(RedisProvider) -> BoxFuture<'static, Result<T, LockError>>,
        decided: impl Fn(&Tally<T>) -> bool,
    ) -> Tally<T> {
        let mut pending: FuturesUnordered<_> = self.masters.iter().cloned().map(op).collect();
        let mut tally = Tally {
            ok: Vec::new(),
            refused: Vec::new(),
            errors: Vec::new(),
        };
        while let Some(answer) = pending.next().await {
            match answer {
                Ok(v) if v.is_yes() => tally.ok.push(v),
                Ok(v) => tally.refused.push(v),
                Err(e) => tally.errors.push(e),
            }
            if decided(&tally) {
                if !pending.is_empty() {
                    tokio::spawn(async move { while pending.next().await.is_some() {} });
                }
                break;
            }
        }
        tally
    }

    /// Whether `tally` can no longer reach a quorum.
    fn lost(&self, ok: usize, answered_no: usize) -> bool {
        answered_no > self.masters.len() - self.quorum || ok >= self.quorum
    }

    fn no_quorum(
        &self,
        operation: &'static str,
        tally_errors: Vec<LockError>,
        ok: usize,
    ) -> LockError {
        let kind = if tally_errors.iter().any(LockError::is_outcome_unknown) {
            BackendErrorKind::OutcomeUnknown
        } else {
            BackendErrorKind::Unavailable
        };
        let first = tally_errors.into_iter().next();
        LockError::Backend(BackendError::new(
            kind,
            operation,
            format!(
                "only {ok} of {} masters answered yes; a quorum is {}",
                self.masters.len(),
                self.quorum
            ),
            first.map(|e| Box::new(e) as _),
        ))
    }

    async fn acquire_inner(&self, request: &AcquireRequest) -> Result<Acquired, LockError> {
        let once = AcquireRequest {
            wait: Wait::Once,
            ..request.clone()
        };
        let mut backoff = Backoff::new(RETRY.0, RETRY.1);
        loop {
            let nonce = nonce(request.expire.is_none());
            // Whatever this round takes is given back unless it ends with an
            // answer, also when the future is dropped mid-round.
            let round = Round {
                set: self,
                keys: &request.keys,
                owner: request.owner.as_deref(),
                nonce: &nonce,
                armed: true,
            };
            let started = Instant::now();
            let tally = self.attempt_everywhere(&once, &nonce).await;
            let elapsed = started.elapsed();
            let valid = request
                .expire
                .is_none_or(|lease| elapsed + drift(lease) < lease);
            if tally.ok.len() >= self.quorum && valid {
                round.disarm();
                return Ok(combine(request, tally, started));
            }
            // Not held: give back whatever this round took, everywhere.
            self.give_back(&request.keys, request.owner.as_deref(), &nonce)
                .await;
            round.disarm();
            let backend = tally.errors.len() > self.masters.len() - self.quorum;
            // The key most masters found held names the conflict.
            let held = most_common(
                tally
                    .refused
                    .iter()
                    .filter_map(|a| a.0.as_ref().err().copied()),
            )
            .unwrap_or(0);
            let remaining = request.wait.remaining();
            if remaining == Some(Duration::ZERO) {
                return Err(if backend {
                    self.no_quorum("acquire", tally.errors, tally.ok.len())
                } else {
                    request.wait.give_up(&request.keys[held])
                });
            }
            let mut nap = backoff.next_pause();
            if let Some(r) = remaining {
                nap = nap.min(r);
            }
            sleep(nap).await;
        }
    }

    /// One attempt with `nonce` on every master at once; out early once a
    /// majority said yes. On a failure every answer is awaited, so that the
    /// give-back by nonce comes after every acquisition of the round.
    async fn attempt_everywhere(&self, once: &AcquireRequest, nonce: &str) -> Tally<Attempt> {
        self.fan_out(
            |m| {
                let (once, nonce) = (once.clone(), nonce.to_owned());
                Box::pin(async move {
                    let owner = once.owner.as_deref().filter(|_| once.indexed);
                    let keys = m.keyset(&once.keys, owner);
                    m.try_once(&once, &keys, &nonce, clock_floor())
                        .await
                        .map(Attempt)
                })
            },
            |t| t.ok.len() >= self.quorum,
        )
        .await
    }

    /// Releases what the acquisition `nonce` took among `keys`, on every
    /// master (a master that seemed to refuse may hold it anyway).
    async fn give_back(&self, keys: &[String], owner: Option<&str>, nonce: &str) {
        self.fan_out(
            |m| {
                let (keys, owner, nonce) = (
                    keys.to_vec(),
                    owner.unwrap_or("").to_owned(),
                    nonce.to_owned(),
                );
                Box::pin(async move {
                    m.release_by_nonce(&m.lock_keys(&keys), &owner, &nonce)
                        .await
                        .map(Released)
                })
            },
            |_| false,
        )
        .await;
    }
}

/// The locks a majority granted: per key the highest token, re-entered if
/// any granting master says so (an earlier hold by this owner was on a
/// majority, and any two majorities meet, while a master the earlier call
/// had not reached yet, since it returned on its majority, sees the key as
/// new). The lease runs from no later than the start, less the drift
/// allowance, so `Lease::valid_until` stays on the safe side.
fn combine(request: &AcquireRequest, tally: Tally<Attempt>, started: Instant) -> Acquired {
    let grants: Vec<Acquired> = tally.ok.into_iter().filter_map(|a| a.0.ok()).collect();
    let n = request.keys.len();
    let tokens = (0..n)
        .map(|i| grants.iter().map(|g| g.tokens[i]).max().unwrap_or(0))
        .collect();
    let reentered = (0..n)
        .map(|i| grants.iter().any(|g| g.reentered[i]))
        .collect();
    let sent_at = started - request.expire.map_or(Duration::ZERO, drift);
    Acquired::new(tokens, reentered, sent_at)
}

/// One round of an acquisition, from its fan-out until it holds the locks
/// or has given back what it took. Dropped armed (the caller's future was
/// dropped mid-round), it gives back by nonce on every master in a
/// background task: the scripts already sent still run.
struct Round<'a> {
    set: &'a RedlockProvider,
    keys: &'a [String],
    owner: Option<&'a str>,
    nonce: &'a str,
    armed: bool,
}

impl Round<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "Redlock acquisition abandoned outside a Tokio runtime; its locks expire with their lease"
            );
            return;
        };
        let set = self.set.clone();
        let (keys, owner, nonce) = (
            self.keys.to_vec(),
            self.owner.map(str::to_owned),
            self.nonce.to_owned(),
        );
        runtime.spawn(async move { set.give_back(&keys, owner.as_deref(), &nonce).await });
    }
}

/// This host's clock in microseconds: every master floors its fencing
/// tokens by it, so that the highest token of any majority grows from one
/// acquisition to the next as long as the clients' clocks agree (each
/// master's own counter only grows with the acquisitions it saw).
fn clock_floor() -> u64 {
    crate::redis::wire::clock_us()
}

fn drift(lease: Duration) -> Duration {
    lease.mul_f64(DRIFT_FACTOR) + Duration::from_millis(2)
}

/// A master's answer: yes, or no.
trait Verdict {
    fn is_yes(&self) -> bool;
}

/// An acquisition attempt on one master: what it took, or the index of
/// the key it found held.
struct Attempt(Result<Acquired, usize>);

impl Verdict for Attempt {
    fn is_yes(&self) -> bool {
        self.0.is_ok()
    }
}

/// An extension on one master: `None` if done, else the key not held.
struct Extended(Option<String>);

impl Verdict for Extended {
    fn is_yes(&self) -> bool {
        self.0.is_none()
    }
}

fn most_common<T: Ord + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts = std::collections::BTreeMap::new();
    for i in items {
        *counts.entry(i).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(i, _)| i)
}

impl Verdict for bool {
    fn is_yes(&self) -> bool {
        *self
    }
}

/// Per key, whether a master released it.
struct Released(Vec<bool>);

impl Verdict for Released {
    fn is_yes(&self) -> bool {
        true
    }
}

impl LockingProvider for RedlockProvider {
    fn identifier(&self) -> &'static str {
        "locking-redlock"
    }

    fn default_wait_timeout(&self) -> Duration {
        self.wait_timeout
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
            // Every master, always: a master that seemed to refuse the
            // acquisition may hold it anyway.
            let tally = self
                .fan_out(
                    |m| {
                        let (keys, owner) = (keys.to_vec(), owner.map(str::to_owned));
                        Box::pin(
                            async move { m.release(&keys, owner.as_deref()).await.map(Released) },
                        )
                    },
                    |_| false,
                )
                .await;
            if tally.ok.len() < self.quorum {
                return Err(self.no_quorum("release", tally.errors, tally.ok.len()));
            }
            // A key counts as released where a majority released it.
            Ok((0..keys.len())
                .map(|i| tally.ok.iter().filter(|r| r.0[i]).count() >= self.quorum)
                .collect())
        })
    }

    fn extend<'a>(
        &'a self,
        keys: &'a [String],
        owner: Option<&'a str>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), LockError>> {
        Box::pin(async move {
            let started = Instant::now();
            let tally = self
                .fan_out(
                    |m| {
                        let (keys, owner) = (keys.to_vec(), owner.map(str::to_owned));
                        Box::pin(async move {
                            match m.extend(&keys, owner.as_deref(), lease).await {
                                Ok(()) => Ok(Extended(None)),
                                Err(LockError::NotOwner { key }) => Ok(Extended(Some(key))),
                                Err(e) => Err(e),
                            }
                        })
                    },
                    |t| self.lost(t.ok.len(), t.refused.len() + t.errors.len()),
                )
                .await;
            if tally.ok.len() >= self.quorum && started.elapsed() + drift(lease) < lease {
                return Ok(());
            }
            if tally.refused.len() > self.masters.len() - self.quorum {
                let index = most_common(
                    tally
                        .refused
                        .iter()
                        .filter_map(|e| e.0.as_ref())
                        .filter_map(|k| keys.iter().position(|x| x == k)),
                );
                return Err(LockError::NotOwner {
                    key: keys[index.unwrap_or(0)].clone(),
                });
            }
            Err(self.no_quorum("extend", tally.errors, tally.ok.len()))
        })
    }

    fn release_all<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, LockError>> {
        Box::pin(async move {
            let tally = self
                .fan_out(
                    |m| {
                        let owner = owner.map(str::to_owned);
                        Box::pin(async move { m.release_all(owner.as_deref()).await.map(Count) })
                    },
                    |_| false,
                )
                .await;
            if tally.ok.len() < self.quorum {
                return Err(self.no_quorum("release_all", tally.errors, tally.ok.len()));
            }
            // Each master held its own copy of every lock: count them once.
            Ok(tally.ok.iter().map(|c| c.0).max().unwrap_or(0))
        })
    }

    fn inspect<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(async move {
            let views = self.views("inspect", keys, false).await?;
            Ok(self.agreed(keys, &views))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<LockInfo>, LockError>> {
        Box::pin(async move {
            let tally = self
                .fan_out(
                    |m| {
                        let prefix = prefix.to_owned();
                        Box::pin(async move { m.list(&prefix).await.map(Views) })
                    },
                    |_| false,
                )
                .await;
            if tally.ok.len() < self.quorum {
                return Err(self.no_quorum("list", tally.errors, tally.ok.len()));
            }
            // Every key some master holds, judged on all of them at once.
            let mut names: Vec<String> = tally
                .ok
                .iter()
                .flat_map(|v| v.0.iter().map(|i| i.key.clone()))
                .collect();
            names.sort_unstable();
            names.dedup();
            if names.is_empty() {
                return Ok(Vec::new());
            }
            let views = self.views("list", &names, false).await?;
            Ok(self
                .agreed(&names, &views)
                .into_iter()
                .filter(|i| i.state != LockState::Free)
                .collect())
        })
    }

    fn force_release<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<LockInfo>>, LockError>> {
        Box::pin(async move {
            let views = self.views("force_release", keys, true).await?;
            Ok(self
                .agreed(keys, &views)
                .into_iter()
                .map(|i| i.holder().is_some().then_some(i))
                .collect())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for m in &self.masters {
                m.shutdown().await;
            }
        })
    }
}

/// What one master reports of some locks.
struct Views(Vec<LockInfo>);

impl Verdict for Views {
    fn is_yes(&self) -> bool {
        true
    }
}

impl RedlockProvider {
    /// Each master's view of `keys` (inspected, or force-released when
    /// `force`: every master, as a release), from at least a quorum.
    async fn views(
        &self,
        operation: &'static str,
        keys: &[String],
        force: bool,
    ) -> Result<Vec<Vec<LockInfo>>, LockError> {
        let tally = self
            .fan_out(
                |m| {
                    let keys = keys.to_vec();
                    Box::pin(async move {
                        if force {
                            let freed = m.force_release(&keys).await?;
                            Ok(Views(
                                keys.iter()
                                    .zip(freed)
                                    .map(|(k, f)| {
                                        f.unwrap_or_else(|| LockInfo::new(k, LockState::Free, 0))
                                    })
                                    .collect(),
                            ))
                        } else {
                            m.inspect(&keys).await.map(Views)
                        }
                    })
                },
                |_| false,
            )
            .await;
        if tally.ok.len() < self.quorum {
            return Err(self.no_quorum(operation, tally.errors, tally.ok.len()));
        }
        Ok(tally.ok.into_iter().map(|v| v.0).collect())
    }

    /// Per key, the holder a quorum of masters agrees on (same owner): its
    /// newest token, earliest acquisition, shortest lease among them;
    /// otherwise free, since no acquisition holds it validly.
    fn agreed(&self, keys: &[String], views: &[Vec<LockInfo>]) -> Vec<LockInfo> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                let reports: Vec<&LockInfo> = views.iter().filter_map(|v| v.get(i)).collect();
                let waiting = reports.iter().map(|r| r.waiting).max().unwrap_or(0);
                let holders: Vec<&LockHolder> = reports.iter().filter_map(|r| r.holder()).collect();
                let agreed = holders.iter().find_map(|h| {
                    let same: Vec<&&LockHolder> =
                        holders.iter().filter(|o| o.owner == h.owner).collect();
                    (same.len() >= self.quorum).then_some(same)
                });
                let state = match agreed {
                    Some(same) => {
                        let first = same.iter().min_by_key(|h| h.acquired_at).expect("a quorum");
                        LockState::Held(
                            LockHolder::new(
                                first.owner.clone(),
                                same.iter().map(|h| h.fencing_token).max().unwrap_or(0),
                                first.acquired_at,
                                same.iter().map(|h| h.held_for).max().unwrap_or_default(),
                            )
                            .with_lease_left(same.iter().filter_map(|h| h.lease_left).min())
                            .with_metadata(first.metadata.clone()),
                        )
                    }
                    None => LockState::Free,
                };
                LockInfo::new(key.clone(), state, waiting)
            })
            .collect()
    }
}

/// How many locks a master released.
struct Count(u64);

impl Verdict for Count {
    fn is_yes(&self) -> bool {
        true
    }
}
