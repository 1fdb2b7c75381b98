//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade
//! (feature `metrics`). This module has nothing to call: it documents the
//! series; install any `metrics` recorder (an exporter) to receive them.
//!
//! With the feature on, lockstep records the series below into whatever
//! recorder the program installs (an exporter of its choice); with no
//! recorder installed they cost a check each. With the feature off every
//! function of this module is an empty `#[inline]` no-op, so the call sites
//! elsewhere need no `cfg` and nothing is compiled in.
//!
//! | Name | Kind | Labels | What |
//! |------|------|--------|------|
//! | `lockstep_acquire_seconds` | histogram | `provider`, `outcome` | How long an acquisition took (its wait included); `outcome` is `acquired`, `contended` (a single attempt refused), `timed_out` (the wait reached its deadline) or `error` |
//! | `lockstep_hold_seconds` | histogram | `provider` | From acquisition to release, for a [`Lease`](crate::Lease) released by `release` (or by its guard) and for `execute` |
//! | `lockstep_leases_lost_total` | counter | `provider` | Leases `execute` lost while its job ran (the job's loss signal fired) |
//! | `lockstep_renewals_total` | counter | `provider`, `outcome` | `execute`'s lease renewals: `ok` or `failed` (refused, a backend failure, or no answer in time) |
//! | `lockstep_waiting` | gauge | `provider` | Acquisitions waiting for a held lock right now: up when a call starts waiting, down when it stops however it stops (a dropped future too) |
//! | `lockstep_wakeups_total` | counter | `provider`, `cause` | Waiting acquisitions woken to try again: `notification` (a release: a message, or a hand-off by a local release), `expiry` (the holder's lease as last seen ran out) or `fallback` (the periodic check while no news arrives) |
//! | `lockstep_script_reloads_total` | counter | `script` | Lua scripts (or the function library) loaded again after `NOSCRIPT` or `Function not found` (a restarted, flushed or promoted Redis) |
//!
//! Labels are bounded: `provider` is the id a provider is registered under
//! in the [`LockingModule`](crate::LockingModule) (a provider used directly,
//! not through a module, reports its [`identifier`]), `outcome` and `cause`
//! take the values above, `script` one of the script names (`acquire`,
//! `release`, `extend`, `release_all`, `withdraw`, `inspect`,
//! `force_release`). A key, an owner or a token is never a label.
//!
//! Durations are recorded in seconds. Wake-ups are counted for the Redis
//! provider's notified waits and for the in-memory provider (which has no
//! fallback check); a Redis provider with notifications off polls, and its
//! naps are not counted as wake-ups.
//!
//! [`identifier`]: crate::provider::LockingProvider::identifier

use std::future::Future;
use std::time::Duration;

/// `lockstep_acquire_seconds`.
#[cfg(feature = "metrics")]
const ACQUIRE_SECONDS: &str = "lockstep_acquire_seconds";
/// `lockstep_hold_seconds`.
#[cfg(feature = "metrics")]
const HOLD_SECONDS: &str = "lockstep_hold_seconds";
/// `lockstep_leases_lost_total`.
#[cfg(feature = "metrics")]
const LEASES_LOST_TOTAL: &str = "lockstep_leases_lost_total";
/// `lockstep_renewals_total`.
#[cfg(feature = "metrics")]
const RENEWALS_TOTAL: &str = "lockstep_renewals_total";
/// `lockstep_waiting`.
#[cfg(feature = "metrics")]
const WAITING: &str = "lockstep_waiting";
/// `lockstep_wakeups_total`.
#[cfg(feature = "metrics")]
const WAKEUPS_TOTAL: &str = "lockstep_wakeups_total";
/// `lockstep_script_reloads_total`.
#[cfg(all(feature = "metrics", feature = "redis"))]
const SCRIPT_RELOADS_TOTAL: &str = "lockstep_script_reloads_total";

/// Why a waiting acquisition woke to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wakeup {
    /// A release: a message on the notification channel, or a local
    /// release's hand-off.
    Notification,
    /// The holder's lease, as last seen, ran out.
    Expiry,
    /// The fallback check (no news for a while; Redis only).
    #[cfg(feature = "redis")]
    Fallback,
}

impl Wakeup {
    #[cfg(feature = "metrics")]
    fn label(self) -> &'static str {
        match self {
            Wakeup::Notification => "notification",
            Wakeup::Expiry => "expiry",
            #[cfg(feature = "redis")]
            Wakeup::Fallback => "fallback",
        }
    }
}

#[cfg(feature = "metrics")]
tokio::task_local! {
    /// The id of the provider the current acquisition was routed to.
    static PROVIDER: std::sync::Arc<str>;
}

/// The provider id for series recorded inside a provider: the module's id
/// for the call under way, else the provider's own identifier.
#[cfg(feature = "metrics")]
fn current_provider(fallback: &'static str) -> ::metrics::SharedString {
    PROVIDER
        .try_with(|p| ::metrics::SharedString::from(p.to_string()))
        .unwrap_or_else(|_| ::metrics::SharedString::const_str(fallback))
}

/// Runs `fut` (a provider's acquisition) with `provider` as the id that the
/// series recorded inside it carry.
#[cfg(feature = "metrics")]
pub(crate) fn scoped<F: Future>(provider: &str, fut: F) -> impl Future<Output = F::Output> {
    PROVIDER.scope(std::sync::Arc::from(provider), fut)
}

/// Runs `fut` as it is (metrics are off).
#[cfg(not(feature = "metrics"))]
#[inline]
pub(crate) fn scoped<F: Future>(_provider: &str, fut: F) -> F {
    fut
}

/// Records an acquisition's duration and outcome (`acquired`, `contended`,
/// `timed_out`, `error`).
#[inline]
pub(crate) fn acquisition(provider: &str, outcome: &'static str, took: Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(ACQUIRE_SECONDS, "provider" => provider.to_owned(), "outcome" => outcome)
        .record(took);
    #[cfg(not(feature = "metrics"))]
    let _ = (provider, outcome, took);
}

/// When a lock was acquired, for `lockstep_hold_seconds` (zero-sized with
/// the feature off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Acquired {
    #[cfg(feature = "metrics")]
    at: tokio::time::Instant,
}

impl Acquired {
    /// Now.
    #[inline]
    pub(crate) fn now() -> Acquired {
        Acquired {
            #[cfg(feature = "metrics")]
            at: tokio::time::Instant::now(),
        }
    }

    /// The lock acquired at this moment was released now.
    #[inline]
    pub(crate) fn released(&self, provider: &str) {
        #[cfg(feature = "metrics")]
        ::metrics::histogram!(HOLD_SECONDS, "provider" => provider.to_owned())
            .record(self.at.elapsed());
        #[cfg(not(feature = "metrics"))]
        let _ = provider;
    }
}

/// `execute` lost its lease.
#[inline]
pub(crate) fn lease_lost(provider: &str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(LEASES_LOST_TOTAL, "provider" => provider.to_owned()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = provider;
}

/// A renewal by `execute` succeeded (`ok`) or not.
#[inline]
pub(crate) fn renewal(provider: &str, ok: bool) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(
        RENEWALS_TOTAL,
        "provider" => provider.to_owned(),
        "outcome" => if ok { "ok" } else { "failed" }
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (provider, ok);
}

/// A waiting acquisition woke to try again.
#[inline]
pub(crate) fn wakeup(fallback_provider: &'static str, cause: Wakeup) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(
        WAKEUPS_TOTAL,
        "provider" => current_provider(fallback_provider),
        "cause" => cause.label()
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (fallback_provider, cause);
}

/// A sleeping waiter woke: by a notification if `notified`, else by the
/// timer it slept on (`None`: its deadline, which is no wake-up).
#[cfg(feature = "redis")]
#[inline]
pub(crate) fn woke(fallback_provider: &'static str, notified: bool, timer: Option<Wakeup>) {
    if let Some(cause) = if notified {
        Some(Wakeup::Notification)
    } else {
        timer
    } {
        wakeup(fallback_provider, cause);
    }
}

/// A script was loaded again after `NOSCRIPT`.
#[cfg(feature = "redis")]
#[inline]
pub(crate) fn script_reloaded(script: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(SCRIPT_RELOADS_TOTAL, "script" => script).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = script;
}

/// One acquisition counted in `lockstep_waiting` while it lives: made when
/// the call starts waiting, dropped however it stops (zero-sized with the
/// feature off).
#[derive(Debug)]
pub(crate) struct Waiting {
    #[cfg(feature = "metrics")]
    gauge: ::metrics::Gauge,
}

impl Waiting {
    /// The call starts waiting.
    #[inline]
    #[must_use = "the call counts as waiting while this lives"]
    pub(crate) fn start(fallback_provider: &'static str) -> Waiting {
        #[cfg(feature = "metrics")]
        {
            let gauge =
                ::metrics::gauge!(WAITING, "provider" => current_provider(fallback_provider));
            gauge.increment(1.0);
            Waiting { gauge }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = fallback_provider;
            Waiting {}
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for Waiting {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}
