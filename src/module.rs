//! The Locking Module: routes each call to a provider by id.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{Instrument, field};

use crate::error::{ConfigError, LockError};
use crate::inspect::{combine, validate_metadata};
use crate::keys::{Keys, validate_owner};
use crate::lease::Lease;
use crate::memory::InMemoryProvider;
use crate::metrics;
use crate::options::{
    AcquireOptions, ExtendOptions, Patience, ReleaseOptions, check_lease, check_max,
};
use crate::provider::{AcquireRequest, Acquired, LockingProvider, Wait};

/// The id under which the in-memory provider is registered, unless a
/// provider configured under this id takes its place.
pub const IN_MEMORY_PROVIDER_ID: &str = "in-memory";

/// The Locking Module service: `execute`, `acquire`, `release`,
/// `release_all` and `extend`, routed to a provider by id.
///
/// Cloning is cheap; clones share the providers.
///
/// The in-memory provider is registered as `"in-memory"` (unless a provider
/// is configured under that id: it takes its place). The default
/// provider follows Medusa's rules: the only configured provider if there is
/// exactly one; otherwise the last one registered as default; otherwise
/// `"in-memory"`. A call can name another provider with its `provider` option.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), lockstep::LockError> {
/// use lockstep::{AcquireOptions, LockingModule, ReleaseOptions};
///
/// let locking = LockingModule::new();
/// let lease = locking
///     .acquire("order_1", AcquireOptions::new().owner_id("run-1"))
///     .await?;
/// assert!(locking
///     .acquire("order_1", AcquireOptions::new().owner_id("run-2"))
///     .await
///     .is_err());
/// assert!(locking
///     .release("order_1", ReleaseOptions::new().owner_id("run-1"))
///     .await?);
/// # let _ = lease;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockingModule {
    inner: Arc<Inner>,
}

struct Inner {
    providers: HashMap<String, Arc<dyn LockingProvider>>,
    default_id: String,
    /// `host=.. pid=..`, recorded with every acquisition, if asked for.
    process: Option<String>,
}

impl LockingModule {
    /// A module with only the in-memory provider.
    pub fn new() -> Self {
        LockingModule::builder()
            .build()
            .expect("the in-memory provider alone is always a valid configuration")
    }

    /// A builder to register providers.
    pub fn builder() -> LockingModuleBuilder {
        LockingModuleBuilder::default()
    }

    /// The id of the default provider.
    pub fn default_provider_id(&self) -> &str {
        &self.inner.default_id
    }

    /// The registered provider ids, sorted.
    pub fn provider_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.inner.providers.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// The provider registered under `id`, or the default one for `None`.
    ///
    /// # Errors
    ///
    /// [`LockError::UnknownProvider`] with Medusa's message.
    pub fn provider(&self, id: Option<&str>) -> Result<&Arc<dyn LockingProvider>, LockError> {
        Ok(self.route(id)?.1)
    }

    /// The id of the provider a call with this `provider` option would use.
    pub(crate) fn resolve_provider_id(&self, id: Option<&str>) -> Result<String, LockError> {
        Ok(self.route(id)?.0.to_owned())
    }

    pub(crate) fn route(
        &self,
        id: Option<&str>,
    ) -> Result<(&str, &Arc<dyn LockingProvider>), LockError> {
        let id = id.unwrap_or(&self.inner.default_id);
        self.inner
            .providers
            .get_key_value(id)
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| LockError::UnknownProvider { id: id.to_owned() })
    }

    /// Acquires every key, or none.
    ///
    /// With no `timeout` (or a zero one) this is a single attempt, as
    /// Medusa's `acquire`; with one, it waits for locks held by others until
    /// the deadline. Keys are de-duplicated. The returned [`Lease`] carries
    /// the owner and a fencing token per key.
    ///
    /// # Errors
    ///
    /// - [`LockError::Contended`] (`Failed to acquire lock for key "<key>"`)
    ///   when a key is held by another owner, or anonymously, on a single
    ///   attempt; [`LockError::TimedOut`] when the wait ends at its deadline;
    /// - [`LockError::InvalidInput`] for an empty key list, an empty or
    ///   overlong key or owner, a zero or absurd duration;
    /// - [`LockError::UnknownProvider`], [`LockError::ForeignValue`],
    ///   [`LockError::Backend`].
    ///
    /// In every error case nothing is held.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in effect: if the future is dropped, nothing stays held
    /// and nothing is left queued. The in-memory provider takes all keys in
    /// one synchronous step, and a dropped wait leaves its registry. The
    /// Redis provider undoes an acquisition whose script may have run, by
    /// its nonce, in a background task (a round trip later; retried until
    /// it succeeds or the lease would have ended), and withdraws a wait's
    /// queue entry the same way; a Redlock set gives back on every master.
    /// A dropped wait loses its place in line.
    pub async fn acquire(
        &self,
        keys: impl Into<Keys>,
        options: AcquireOptions,
    ) -> Result<Lease, LockError> {
        let (id, provider) = self.route(options.provider.as_deref())?;
        let keys = keys.into().validated()?;
        validate_owner(options.owner_id.as_deref())?;
        let expire = options
            .expire
            .map(|e| check_lease("expire", e))
            .transpose()?;
        let wait = wait_of(options.patience, Wait::Once)?;
        let metadata = self.holder_metadata(options.metadata.as_deref())?;
        let request = AcquireRequest {
            keys,
            owner: options.owner_id,
            expire,
            wait,
            indexed: true,
            metadata,
        };
        let acquired = acquire_traced(id, provider, &request).await?;
        Ok(Lease {
            keys: request.keys,
            tokens: acquired.tokens,
            reentered: acquired.reentered,
            owner: request.owner,
            expire,
            sent_at: acquired.sent_at,
            acquired_at: metrics::Acquired::now(),
            provider_id: id.to_owned(),
            provider: Arc::clone(provider),
        })
    }

    /// Releases the keys held by the owner given in `options`; with no
    /// owner, only anonymous locks are released. Returns `true` only if
    /// every key was released; the keys that could be released are released
    /// either way, and keys held by others are left alone.
    ///
    /// # Errors
    ///
    /// [`LockError::InvalidInput`], [`LockError::UnknownProvider`],
    /// [`LockError::Backend`]. A key not held by the owner is not an error.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened;
    /// it can be repeated. A local waiter it was handing a lock to learns
    /// the outcome either way: it takes the lock, or the hand-off is undone.
    pub async fn release(
        &self,
        keys: impl Into<Keys>,
        options: ReleaseOptions,
    ) -> Result<bool, LockError> {
        let (id, provider) = self.route(options.provider.as_deref())?;
        let keys = keys.into().validated()?;
        validate_owner(options.owner_id.as_deref())?;
        let span = op_span("lockstep.release", id, keys.len());
        let result = provider
            .release(&keys, options.owner_id.as_deref())
            .instrument(span.clone())
            .await
            .map(|r| r.iter().all(|x| *x));
        span.record(
            "outcome",
            match &result {
                Ok(true) => "released",
                Ok(false) => "not_all_held",
                Err(_) => "error",
            },
        );
        result
    }

    /// Releases every lock of the owner given in `options` (without
    /// scanning anything else), or, with no owner, every lock of the
    /// provider. Returns how many locks were released.
    ///
    /// # Errors
    ///
    /// [`LockError::InvalidInput`], [`LockError::UnknownProvider`],
    /// [`LockError::Backend`].
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release may or may not have happened
    /// (each Redis script is atomic: an owner's locks, or a namespace's on
    /// a server, are released all together or not at all); it can be
    /// repeated.
    pub async fn release_all(&self, options: ReleaseOptions) -> Result<u64, LockError> {
        let (id, provider) = self.route(options.provider.as_deref())?;
        validate_owner(options.owner_id.as_deref())?;
        let span = op_span("lockstep.release_all", id, 0);
        let result = provider
            .release_all(options.owner_id.as_deref())
            .instrument(span.clone())
            .await;
        span.record("outcome", if result.is_ok() { "released" } else { "error" });
        result
    }

    /// Sets the lease of every key to `options.expire` from now, if the
    /// owner holds all of them; otherwise nothing changes.
    ///
    /// # Errors
    ///
    /// [`LockError::NotOwner`] naming the first key not held by the owner,
    /// [`LockError::InvalidInput`], [`LockError::UnknownProvider`],
    /// [`LockError::Backend`].
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the extension may or may not have happened
    /// (on one server, for every key or for none); the locks stay held
    /// either way, and it can be repeated.
    pub async fn extend(
        &self,
        keys: impl Into<Keys>,
        options: ExtendOptions,
    ) -> Result<(), LockError> {
        let (id, provider) = self.route(options.provider.as_deref())?;
        let keys = keys.into().validated()?;
        validate_owner(options.owner_id.as_deref())?;
        let lease = check_lease("expire", options.expire)?;
        extend_traced(id, provider, &keys, options.owner_id.as_deref(), lease).await
    }

    /// Shuts every provider down (closing Redis connections). Later calls
    /// fail with [`LockError::Shutdown`].
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the providers shut down so far stay shut
    /// down; calling it again shuts down the rest.
    pub async fn shutdown(&self) {
        // A provider registered under two ids is shut down once.
        let mut distinct: Vec<&Arc<dyn LockingProvider>> = Vec::new();
        for provider in self.inner.providers.values() {
            if !distinct.iter().any(|p| Arc::ptr_eq(p, provider)) {
                distinct.push(provider);
            }
        }
        for provider in distinct {
            provider.shutdown().await;
        }
    }
}

impl Default for LockingModule {
    fn default() -> Self {
        LockingModule::new()
    }
}

impl fmt::Debug for LockingModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockingModule")
            .field("providers", &self.provider_ids())
            .field("default", &self.inner.default_id)
            .finish()
    }
}

/// Turns the caller's patience into a provider [`Wait`].
pub(crate) fn wait_of(patience: Patience, default: Wait) -> Result<Wait, LockError> {
    Ok(match patience {
        Patience::Default => default,
        Patience::For(d) if d.is_zero() => Wait::Once,
        Patience::For(d) => Wait::Until(Instant::now() + check_max("timeout", d)?),
        Patience::Forever => Wait::Forever,
    })
}

fn op_span(name: &'static str, provider: &str, keys: usize) -> tracing::Span {
    // One span name per operation; the fields are filled in as the call ends.
    match name {
        "lockstep.acquire" => tracing::debug_span!(
            "lockstep.acquire",
            provider = provider,
            keys = keys,
            outcome = field::Empty,
            wait_us = field::Empty
        ),
        "lockstep.release" => tracing::debug_span!(
            "lockstep.release",
            provider = provider,
            keys = keys,
            outcome = field::Empty
        ),
        "lockstep.extend" => tracing::debug_span!(
            "lockstep.extend",
            provider = provider,
            keys = keys,
            outcome = field::Empty
        ),
        _ => tracing::debug_span!(
            "lockstep.release_all",
            provider = provider,
            outcome = field::Empty
        ),
    }
}

/// `provider.acquire` inside a `lockstep.acquire` span.
pub(crate) async fn acquire_traced(
    id: &str,
    provider: &Arc<dyn LockingProvider>,
    request: &AcquireRequest,
) -> Result<Acquired, LockError> {
    let span = op_span("lockstep.acquire", id, request.keys.len());
    let started = Instant::now();
    let result = metrics::scoped(id, provider.acquire(request))
        .instrument(span.clone())
        .await;
    let took = started.elapsed();
    span.record("wait_us", took.as_micros() as u64);
    let outcome = match &result {
        Ok(_) => "acquired",
        Err(LockError::Contended { .. }) => "contended",
        Err(LockError::TimedOut { .. }) => "timed_out",
        Err(_) => "error",
    };
    span.record("outcome", outcome);
    metrics::acquisition(id, outcome, took);
    result
}

/// `provider.extend` inside a `lockstep.extend` span.
pub(crate) async fn extend_traced(
    id: &str,
    provider: &Arc<dyn LockingProvider>,
    keys: &[String],
    owner: Option<&str>,
    lease: std::time::Duration,
) -> Result<(), LockError> {
    let span = op_span("lockstep.extend", id, keys.len());
    let result = provider
        .extend(keys, owner, lease)
        .instrument(span.clone())
        .await;
    span.record(
        "outcome",
        match &result {
            Ok(()) => "extended",
            Err(LockError::NotOwner { .. }) => "not_owner",
            Err(_) => "error",
        },
    );
    result
}

impl LockingModule {
    /// The metadata an acquisition records, the call's checked.
    pub(crate) fn holder_metadata(&self, call: Option<&str>) -> Result<Option<String>, LockError> {
        if let Some(m) = call {
            validate_metadata(m)?;
        }
        Ok(combine(self.inner.process.as_deref(), call))
    }
}

/// Registers providers and picks the default one (Medusa's rules).
#[derive(Default)]
pub struct LockingModuleBuilder {
    providers: Vec<(String, Arc<dyn LockingProvider>, bool)>,
    in_memory: Option<InMemoryProvider>,
    record_holder: bool,
}

impl LockingModuleBuilder {
    /// Registers a provider under `id`.
    pub fn provider(self, id: impl Into<String>, provider: impl LockingProvider + 'static) -> Self {
        self.provider_arc(id, Arc::new(provider), false)
    }

    /// Registers a provider under `id`, flagged as the default (Medusa's
    /// `is_default: true`; with several flagged, the last one wins).
    pub fn default_provider(
        self,
        id: impl Into<String>,
        provider: impl LockingProvider + 'static,
    ) -> Self {
        self.provider_arc(id, Arc::new(provider), true)
    }

    /// Registers a shared provider under `id`.
    pub fn provider_arc(
        mut self,
        id: impl Into<String>,
        provider: Arc<dyn LockingProvider>,
        is_default: bool,
    ) -> Self {
        self.providers.push((id.into(), provider, is_default));
        self
    }

    /// Records `host=<name> pid=<pid>` with every acquisition, for
    /// [`inspect`](LockingModule::inspect) and `lockstep locks list` to
    /// show (before the call's own
    /// [`metadata`](crate::AcquireOptions::metadata), if any). Off by
    /// default: it costs the bytes in every lock.
    pub fn record_holder(mut self, on: bool) -> Self {
        self.record_holder = on;
        self
    }

    /// Replaces the built-in in-memory provider (e.g. to set its wait timeout).
    pub fn in_memory(mut self, provider: InMemoryProvider) -> Self {
        self.in_memory = Some(provider);
        self
    }

    /// Builds the module.
    ///
    /// The in-memory provider is registered as `"in-memory"` unless a
    /// configured provider takes that id. Default: the only configured
    /// provider; else the last one flagged default; else `"in-memory"`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::MissingProviderId`] for an empty id,
    /// [`ConfigError::DuplicateProvider`] when two configured providers share
    /// an id.
    pub fn build(self) -> Result<LockingModule, ConfigError> {
        let mut providers: HashMap<String, Arc<dyn LockingProvider>> = HashMap::new();
        providers.insert(
            IN_MEMORY_PROVIDER_ID.to_owned(),
            Arc::new(self.in_memory.unwrap_or_default()),
        );
        let mut configured = std::collections::HashSet::new();
        let mut flagged = None;
        for (id, provider, is_default) in &self.providers {
            if id.is_empty() {
                return Err(ConfigError::MissingProviderId);
            }
            if !configured.insert(id.clone()) {
                return Err(ConfigError::DuplicateProvider { id: id.clone() });
            }
            providers.insert(id.clone(), Arc::clone(provider));
            if *is_default {
                flagged = Some(id.clone());
            }
        }
        let default_id = match (self.providers.len(), flagged) {
            (1, _) => self.providers[0].0.clone(),
            (_, Some(id)) => id,
            _ => IN_MEMORY_PROVIDER_ID.to_owned(),
        };
        if self.providers.len() > 1 {
            tracing::info!("Locking module: Using \"{default_id}\" as default.");
        }
        Ok(LockingModule {
            inner: Arc::new(Inner {
                providers,
                default_id,
                process: self.record_holder.then(crate::inspect::this_process),
            }),
        })
    }
}

impl fmt::Debug for LockingModuleBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockingModuleBuilder")
            .field(
                "providers",
                &self
                    .providers
                    .iter()
                    .map(|(id, _, d)| (id, d))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}
