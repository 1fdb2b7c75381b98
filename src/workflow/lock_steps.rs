//! `acquire_lock_step` and `release_lock_step` (Medusa's `acquireLockStep`
//! and `releaseLockStep`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::LockError;
use crate::keys::Keys;
use crate::module::LockingModule;
use crate::options::{AcquireOptions, ReleaseOptions};
use crate::retry::ride_out;
use crate::workflow::StepError;
use crate::workflow::run::{Extension, Run};
use crate::workflow::step::{Step, StepContext, StepResponse};

/// The pause before trying again after a transient backend error.
const TRANSIENT_PAUSE: Duration = Duration::from_millis(50);

/// Medusa's default retry interval of `acquireLockStep`.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(300);

/// The input of [`acquire_lock_step`] (Medusa's `AcquireLockStepInput`).
#[derive(Debug, Clone)]
pub struct AcquireLockInput {
    keys: Vec<String>,
    timeout: Duration,
    retry_interval: Duration,
    ttl: Option<Duration>,
    owner_id: Option<String>,
    provider: Option<String>,
    execute_on_sub_workflow: bool,
}

impl AcquireLockInput {
    /// Lock `keys` (one or several; none makes the step a no-op), one
    /// attempt, no ttl, owned by the root run.
    pub fn new(keys: impl Into<Keys>) -> Self {
        AcquireLockInput {
            keys: keys.into().as_slice().to_vec(),
            timeout: Duration::ZERO,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            ttl: None,
            owner_id: None,
            provider: None,
            execute_on_sub_workflow: false,
        }
    }

    /// How long to keep trying (default zero: one attempt).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Medusa's pause between two attempts (default 0.3 s). Accepted for
    /// compatibility and not used: lockstep waits on the provider for the
    /// whole timeout, woken by the release, and keeps its place in line.
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// The lease of the locks (default: none, they do not expire).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The owner (default: the root run's id; see
    /// [`acquire_lock_step`]).
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.owner_id = Some(owner.into());
        self
    }

    /// The provider id (default: the module's default).
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }

    /// In a sub-workflow, lock as the sub-workflow's own run rather than as
    /// the parent's owner (default false).
    pub fn execute_on_sub_workflow(mut self, yes: bool) -> Self {
        self.execute_on_sub_workflow = yes;
        self
    }
}

/// The input of [`release_lock_step`] (Medusa's `ReleaseLockStepInput`).
#[derive(Debug, Clone)]
pub struct ReleaseLockInput {
    keys: Vec<String>,
    owner_id: Option<String>,
    provider: Option<String>,
    execute_on_sub_workflow: bool,
}

impl ReleaseLockInput {
    /// Release `keys` (none makes the step a no-op returning `true`).
    pub fn new(keys: impl Into<Keys>) -> Self {
        ReleaseLockInput {
            keys: keys.into().as_slice().to_vec(),
            owner_id: None,
            provider: None,
            execute_on_sub_workflow: false,
        }
    }

    /// The owner (default: as [`AcquireLockInput`]).
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.owner_id = Some(owner.into());
        self
    }

    /// The provider id (default: the module's default).
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider = Some(id.into());
        self
    }

    /// As [`AcquireLockInput::execute_on_sub_workflow`].
    pub fn execute_on_sub_workflow(mut self, yes: bool) -> Self {
        self.execute_on_sub_workflow = yes;
        self
    }
}

/// What [`acquire_lock_step`] gives to the rest of the workflow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcquiredLock {
    /// The distinct keys held (empty when the step had no keys).
    pub keys: Vec<String>,
    /// The owner they are held by.
    pub owner_id: String,
    /// The provider id.
    pub provider: String,
    /// The fencing token of each key: pass it with the writes the lock guards.
    pub fencing_tokens: Vec<u64>,
    /// Whether each key was already held by the owner (a parent run).
    pub reentered: Vec<bool>,
}

impl AcquiredLock {
    /// The fencing token of `key`.
    pub fn token_of(&self, key: &str) -> Option<u64> {
        self.keys
            .iter()
            .position(|k| k == key)
            .map(|i| self.fencing_tokens[i])
    }
}

/// What the acquire step's compensation releases: exactly the keys the
/// step took (not those it re-entered).
#[derive(Debug, Clone)]
pub struct TakenLocks {
    keys: Vec<String>,
    owner: String,
    provider: String,
}

/// A lock taken by a lock step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeldLock {
    provider: String,
    key: String,
    owner: String,
}

/// The locks a run's acquire steps took and its release steps did not
/// release yet, kept in the run ([`Run::extension`]): a release step in a
/// sub-workflow leaves alone what an enclosing run took. A sub-workflow
/// that succeeds hands its locks to its parent; a run dropped before it
/// finished releases them in the background.
#[derive(Debug, Default)]
struct HeldLocks(Mutex<(Vec<HeldLock>, Option<LockingModule>)>);

impl HeldLocks {
    fn locked(&self) -> std::sync::MutexGuard<'_, (Vec<HeldLock>, Option<LockingModule>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records locks newly taken in `locking` by a lock step of `run`.
    fn record(run: &Run, locking: &LockingModule, locks: impl IntoIterator<Item = HeldLock>) {
        let state = run.extension::<HeldLocks>();
        let mut held = state.locked();
        held.0.extend(locks);
        held.1.get_or_insert_with(|| locking.clone());
    }

    /// Forgets locks released by a lock step of `run`.
    fn forget(run: &Run, provider: &str, keys: &[String]) {
        run.extension::<HeldLocks>()
            .locked()
            .0
            .retain(|h| !(h.provider == provider && keys.contains(&h.key)));
    }

    /// Whether a run enclosing `run` holds `key` with `owner` through a
    /// lock step.
    fn held_above(run: &Run, provider: &str, key: &str, owner: &str) -> bool {
        let mut next = run.parent();
        while let Some(r) = next {
            if r.extension::<HeldLocks>()
                .locked()
                .0
                .iter()
                .any(|h| h.provider == provider && h.key == key && h.owner == owner)
            {
                return true;
            }
            next = r.parent();
        }
        false
    }
}

impl Extension for HeldLocks {
    fn adopt(&self, child: &Self) {
        let (taken, locking) = std::mem::take(&mut *child.locked());
        let mut held = self.locked();
        held.0.extend(taken);
        if held.1.is_none() {
            held.1 = locking;
        }
    }

    fn abandon(&self) {
        let (held, locking) = std::mem::take(&mut *self.locked());
        let (Some(locking), false) = (locking, held.is_empty()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("a run dropped outside a Tokio runtime keeps its locks until their ttl");
            return;
        };
        runtime.spawn(async move {
            // Owner-checked: a lock that moved on (its ttl ran out and
            // another run took it) is left alone.
            for h in held {
                let options = ReleaseOptions::new()
                    .owner_id(&h.owner)
                    .provider(&h.provider);
                let keys = [h.key.clone()];
                if let Err(e) = release_riding_out_failovers(&locking, &keys, options).await {
                    tracing::warn!(key = %h.key, "releasing a dropped run's lock failed; it expires with its ttl: {e}");
                }
            }
        });
    }
}

/// The owner lock steps use when none is given: the root run (inherited by
/// sub-workflows), or the sub-workflow's own run with
/// `execute_on_sub_workflow`.
fn default_owner(run: &Run, own_run: bool) -> String {
    if own_run && run.is_nested() {
        run.id().to_owned()
    } else {
        run.root_id().to_owned()
    }
}

/// The acquire step; see [`acquire_lock_step`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AcquireLockStep;

/// Acquires locks in a workflow (Medusa's `acquireLockStep`), resolving the
/// Locking Module from the run's container.
///
/// Medusa's inputs and defaults: one or several keys (none: a no-op),
/// `timeout` zero (one attempt), `retry_interval` 0.3 s, `ttl` none,
/// `owner_id`, `provider`, `execute_on_sub_workflow`. When the keys stay
/// held until the timeout, the step fails with the provider's error
/// (`Failed to acquire lock for key "<key>"`). If a later step fails, the
/// compensation releases exactly the keys this step took.
///
/// Where lockstep differs from Medusa:
/// - the owner defaults to the **root run's id** instead of an anonymous
///   lock, so no other run's release or late compensation can free it;
/// - a sub-workflow is not skipped: it locks with its parent's owner, so
///   re-locking a key the parent holds is re-entrant (and its compensation
///   leaves the parent's hold alone) while other keys are really locked.
///   `execute_on_sub_workflow(true)` makes it lock as its own run instead;
/// - waiting is done by the provider (woken by the release, served in
///   arrival order), not by sleeping `retry_interval` between attempts;
/// - backend failures that pass ([`LockError::is_transient`]: Redis
///   restarting or failing over) are retried until the timeout, like a held
///   lock; with timeout zero they fail the step at once.
pub fn acquire_lock_step() -> AcquireLockStep {
    AcquireLockStep
}

impl Step for AcquireLockStep {
    type Input = AcquireLockInput;
    type Output = AcquiredLock;
    type Compensation = TakenLocks;

    fn name(&self) -> &str {
        "acquire-lock-step"
    }

    async fn invoke(
        &self,
        ctx: StepContext,
        input: AcquireLockInput,
    ) -> Result<StepResponse<AcquiredLock, TakenLocks>, StepError> {
        if input.keys.is_empty() {
            return Ok(StepResponse::without_compensation(AcquiredLock::default()));
        }
        let locking = ctx.container().locking()?;
        let provider = locking.resolve_provider_id(input.provider.as_deref())?;
        let owner = input
            .owner_id
            .clone()
            .unwrap_or_else(|| default_owner(ctx.run(), input.execute_on_sub_workflow));
        let deadline = Instant::now() + input.timeout;
        let lease = loop {
            // One wait for the whole timeout: the provider is woken by the
            // release and keeps this run's place in line (a wait per
            // `retry_interval` would go to the back of the queue each time).
            let mut options = AcquireOptions::new()
                .owner_id(&owner)
                .timeout(deadline.saturating_duration_since(Instant::now()))
                .provider(&provider);
            if let Some(ttl) = input.ttl {
                options = options.expire(ttl);
            }
            match locking.acquire(input.keys.clone(), options).await {
                Ok(lease) => break lease,
                // Redis briefly away (a restart, a failover) and the
                // provider gave up early: try again until the deadline.
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(
                        TRANSIENT_PAUSE.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                // The provider's single-attempt error, as Medusa rethrows it.
                Err(LockError::TimedOut { key }) => {
                    return Err(Box::new(LockError::Contended { key }));
                }
                Err(e) => return Err(Box::new(e)),
            }
        };
        let taken: Vec<String> = lease.newly_acquired().map(str::to_owned).collect();
        HeldLocks::record(
            ctx.run(),
            &locking,
            taken.iter().map(|key| HeldLock {
                provider: provider.clone(),
                key: key.clone(),
                owner: owner.clone(),
            }),
        );
        let acquired = AcquiredLock {
            keys: lease.keys().to_vec(),
            owner_id: owner.clone(),
            provider: provider.clone(),
            fencing_tokens: lease.fencing_tokens().map(|(_, t)| t).collect(),
            reentered: lease
                .keys()
                .iter()
                .map(|k| lease.was_reentered(k))
                .collect(),
        };
        Ok(StepResponse::new(
            acquired,
            TakenLocks {
                keys: taken,
                owner,
                provider,
            },
        ))
    }

    async fn compensate(&self, ctx: StepContext, taken: TakenLocks) -> Result<(), StepError> {
        if taken.keys.is_empty() {
            return Ok(());
        }
        let locking = ctx.container().locking()?;
        // Owner-checked: if the lease ran out and another run holds a key
        // now, this returns false and leaves it alone.
        release_riding_out_failovers(
            &locking,
            &taken.keys,
            ReleaseOptions::new()
                .owner_id(&taken.owner)
                .provider(&taken.provider),
        )
        .await?;
        HeldLocks::forget(ctx.run(), &taken.provider, &taken.keys);
        Ok(())
    }
}

/// A release that retries transient backend failures ([`LockError::is_transient`]:
/// Redis restarting or failing over) for up to 10 s: an owner-checked
/// release can be repeated safely, and a lock left held would make every
/// other run wait for its lease to end.
async fn release_riding_out_failovers(
    locking: &LockingModule,
    keys: &[String],
    options: ReleaseOptions,
) -> Result<bool, LockError> {
    ride_out(|| locking.release(keys.to_vec(), options.clone())).await
}

/// The release step; see [`release_lock_step`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ReleaseLockStep;

/// Releases locks in a workflow (Medusa's `releaseLockStep`). Returns
/// whether every key was released; `false` is not an error. No
/// compensation.
///
/// The owner defaults as in [`acquire_lock_step`]. In a sub-workflow that
/// locks with its parent's owner, keys the parent took are left held (the
/// parent releases them); the others are released. Backend failures that
/// pass (a restart, a failover) are retried for up to 10 s, as are those of
/// the acquire step's compensation.
pub fn release_lock_step() -> ReleaseLockStep {
    ReleaseLockStep
}

impl Step for ReleaseLockStep {
    type Input = ReleaseLockInput;
    type Output = bool;
    type Compensation = ();

    fn name(&self) -> &str {
        "release-lock-step"
    }

    async fn invoke(
        &self,
        ctx: StepContext,
        input: ReleaseLockInput,
    ) -> Result<StepResponse<bool, ()>, StepError> {
        if input.keys.is_empty() {
            return Ok(StepResponse::without_compensation(true));
        }
        let locking = ctx.container().locking()?;
        let provider = locking.resolve_provider_id(input.provider.as_deref())?;
        let inherited = input.owner_id.is_none() && !input.execute_on_sub_workflow;
        let owner = input
            .owner_id
            .clone()
            .unwrap_or_else(|| default_owner(ctx.run(), input.execute_on_sub_workflow));
        let keys: Vec<String> = input
            .keys
            .into_iter()
            .filter(|k| !(inherited && HeldLocks::held_above(ctx.run(), &provider, k, &owner)))
            .collect();
        if keys.is_empty() {
            return Ok(StepResponse::without_compensation(true));
        }
        let released = release_riding_out_failovers(
            &locking,
            &keys,
            ReleaseOptions::new().owner_id(&owner).provider(&provider),
        )
        .await?;
        HeldLocks::forget(ctx.run(), &provider, &keys);
        Ok(StepResponse::without_compensation(released))
    }
}
