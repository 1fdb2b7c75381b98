//! A run: one execution of a workflow, with its id, container, parent, the
//! stack of compensations its completed steps left, and the per-run state
//! that step families keep in it ([`Run::extension`]).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;

use crate::workflow::StepError;
use crate::workflow::container::Container;

/// State a family of steps keeps per run, in [`Run::extension`]: created
/// empty (`Default`) on first use, shared by every step of the run.
///
/// When a sub-workflow succeeds, what it did becomes part of its parent's
/// run (its compensations join the parent's stack), and so does its
/// state: [`adopt`](Extension::adopt) is called on the parent's state with
/// the child's. The lock steps use it so that locks a finished
/// sub-workflow took count as its parent's.
///
/// When a run's future is dropped before the run finished (a `timeout`
/// around it, an aborted task), no compensation runs, but each state is
/// told with [`abandon`](Extension::abandon): the lock steps release the
/// locks the run took, in the background.
pub trait Extension: Any + Default + Send + Sync {
    /// Takes over the state of a child run that succeeded. The default
    /// keeps nothing.
    fn adopt(&self, child: &Self) {
        let _ = child;
    }

    /// The run was dropped before it finished: let go of what the state
    /// holds. Called once, from a `Drop` (no `.await`: spawn work). The
    /// default does nothing.
    fn abandon(&self) {}
}

/// [`Extension`] with the type erased, for the run's map.
trait AnyExtension: Any + Send + Sync {
    fn adopt_into(&self, parent: &Run);
    fn abandon(&self);
}

impl<T: Extension> AnyExtension for T {
    fn adopt_into(&self, parent: &Run) {
        parent.extension::<T>().adopt(self);
    }

    fn abandon(&self) {
        Extension::abandon(self);
    }
}

/// A compensation waiting on a run's stack.
pub(crate) struct Pending {
    pub(crate) step: String,
    pub(crate) undo: Box<dyn FnOnce() -> BoxFuture<'static, Result<(), CompensationErrors>> + Send>,
}

/// Failures of a group of compensations (a sub-workflow's).
pub(crate) struct CompensationErrors(pub(crate) Vec<CompensationFailure>);

/// A step that failed to compensate.
#[derive(Debug)]
pub struct CompensationFailure {
    /// The step (or `workflow/step` in a sub-workflow).
    pub step: String,
    /// Its error.
    pub error: StepError,
}

/// One execution of a workflow: its id, its container, and its stack of
/// compensations. The body runs steps with [`Run::step`] and sub-workflows
/// with [`Run::run_sub`].
///
/// Cloning is cheap; clones are the same run.
#[derive(Clone)]
pub struct Run {
    inner: Arc<RunInner>,
}

struct RunInner {
    id: String,
    workflow: Arc<str>,
    container: Container,
    parent: Option<Run>,
    /// The root run's id: the default owner of lock steps, inherited by
    /// sub-workflows.
    root_id: String,
    pending: Mutex<Vec<Pending>>,
    failed_step: Mutex<Option<String>>,
    sub_failures: Mutex<Vec<CompensationFailure>>,
    extensions: Mutex<HashMap<TypeId, Arc<dyn AnyExtension>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Run {
    /// A root run.
    pub(crate) fn root(workflow: &Arc<str>, container: Container, id: String) -> Run {
        Run::new(workflow, container, id.clone(), id, None)
    }

    /// A sub-workflow's run under this one, with a fresh id.
    pub(crate) fn child(&self, workflow: &Arc<str>) -> Run {
        Run::new(
            workflow,
            self.inner.container.clone(),
            crate::token::random_id(),
            self.inner.root_id.clone(),
            Some(self.clone()),
        )
    }

    fn new(
        workflow: &Arc<str>,
        container: Container,
        id: String,
        root_id: String,
        parent: Option<Run>,
    ) -> Run {
        Run {
            inner: Arc::new(RunInner {
                id,
                workflow: Arc::clone(workflow),
                container,
                parent,
                root_id,
                pending: Mutex::default(),
                failed_step: Mutex::default(),
                sub_failures: Mutex::default(),
                extensions: Mutex::default(),
            }),
        }
    }

    /// This run's id (unique per run; a sub-workflow has its own).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The id of the outermost run: the default owner of the lock steps of
    /// this run and of every sub-workflow under it.
    pub fn root_id(&self) -> &str {
        &self.inner.root_id
    }

    /// The workflow's name.
    pub fn workflow(&self) -> &str {
        &self.inner.workflow
    }

    /// Whether this run is a sub-workflow of another.
    pub fn is_nested(&self) -> bool {
        self.inner.parent.is_some()
    }

    /// The parent run, for a sub-workflow.
    pub fn parent(&self) -> Option<&Run> {
        self.inner.parent.as_ref()
    }

    /// The services of the run.
    pub fn container(&self) -> &Container {
        &self.inner.container
    }

    /// This run's state of type `T` (see [`Extension`]), created empty on
    /// first use.
    pub fn extension<T: Extension>(&self) -> Arc<T> {
        let mut map = locked(&self.inner.extensions);
        let entry = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()));
        // Upcast to `dyn Any` (trait upcasting), then to the type it is
        // keyed by.
        let any: Arc<dyn Any + Send + Sync> = entry.clone();
        any.downcast::<T>()
            .unwrap_or_else(|_| unreachable!("the map is keyed by type"))
    }

    /// Pushes a compensation on the stack.
    pub(crate) fn push_pending(&self, pending: Pending) {
        locked(&self.inner.pending).push(pending);
    }

    /// Takes the whole stack, oldest first.
    pub(crate) fn take_pending(&self) -> Vec<Pending> {
        std::mem::take(&mut *locked(&self.inner.pending))
    }

    /// Records the step that failed.
    pub(crate) fn set_failed_step(&self, step: String) {
        *locked(&self.inner.failed_step) = Some(step);
    }

    /// The step that failed, if one did.
    pub(crate) fn failed_step(&self) -> Option<String> {
        locked(&self.inner.failed_step).clone()
    }

    /// Records compensation failures of a failed sub-workflow.
    pub(crate) fn add_sub_failures(&self, failures: &mut Vec<CompensationFailure>) {
        locked(&self.inner.sub_failures).append(failures);
    }

    /// Takes the compensation failures of failed sub-workflows.
    pub(crate) fn take_sub_failures(&self) -> Vec<CompensationFailure> {
        std::mem::take(&mut *locked(&self.inner.sub_failures))
    }

    /// A child that succeeded: its state joins this run's.
    pub(crate) fn adopt_extensions(&self, child: &Run) {
        let states: Vec<Arc<dyn AnyExtension>> =
            locked(&child.inner.extensions).values().cloned().collect();
        for state in states {
            state.adopt_into(self);
        }
    }

    /// The run's future was dropped before it finished: every state is
    /// told (see [`Extension::abandon`]).
    pub(crate) fn abandon_extensions(&self) {
        let states: Vec<Arc<dyn AnyExtension>> =
            locked(&self.inner.extensions).values().cloned().collect();
        for state in states {
            state.abandon();
        }
    }

    /// Runs the pending compensations in reverse order; returns the names
    /// compensated and the failures.
    pub(crate) async fn compensate(&self) -> (Vec<String>, Vec<CompensationFailure>) {
        compensate_stack(self.take_pending()).await
    }
}

/// Runs `pending` from the newest to the oldest.
pub(crate) async fn compensate_stack(
    mut pending: Vec<Pending>,
) -> (Vec<String>, Vec<CompensationFailure>) {
    let mut done = Vec::new();
    let mut failures = Vec::new();
    while let Some(p) = pending.pop() {
        tracing::debug!(step = %p.step, "compensating");
        if let Err(CompensationErrors(mut errors)) = (p.undo)().await {
            for f in &errors {
                tracing::warn!(step = %f.step, "compensation failed: {}", f.error);
            }
            failures.append(&mut errors);
        }
        done.push(p.step);
    }
    (done, failures)
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.inner.id)
            .field("workflow", &self.inner.workflow)
            .field("root_id", &self.inner.root_id)
            .field("nested", &self.is_nested())
            .finish_non_exhaustive()
    }
}

/// Tells a run's states it was abandoned if dropped before
/// [`finished`](Unfinished::finished): held by the future that runs a
/// workflow's body.
pub(crate) struct Unfinished(Option<Run>);

impl Unfinished {
    pub(crate) fn new(run: &Run) -> Self {
        Unfinished(Some(run.clone()))
    }

    /// The run ended (successfully, with an error, or with a panic).
    pub(crate) fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(run) = self.0.take() {
            tracing::debug!(run_id = %run.id(), workflow = %run.workflow(), "run dropped before it finished");
            run.abandon_extensions();
        }
    }
}
