//! Workflows: running a body, its steps and sub-workflows, and
//! compensating what completed when something fails.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::error::LockError;
use crate::workflow::StepError;
use crate::workflow::container::Container;
use crate::workflow::run::{
    CompensationErrors, CompensationFailure, Pending, Run, Unfinished, compensate_stack,
};
use crate::workflow::step::{Step, StepContext};

type Body<I, O> = Arc<dyn Fn(Run, I) -> BoxFuture<'static, Result<O, StepError>> + Send + Sync>;

/// A named workflow: an async body that runs steps in order through its
/// [`Run`].
///
/// Inputs and outputs are ordinary Rust values: a step's input is built
/// from the workflow input and the outputs of earlier steps, and the types
/// check at compile time. When a step fails (the body returns an error), the
/// steps completed so far are compensated in reverse order and the run ends
/// with the original error in a [`WorkflowError`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use lockstep::workflow::{create_step, create_workflow, Container, StepError};
///
/// let add_one = create_step("add-one", |_ctx, n: u32| async move { Ok::<_, StepError>(n + 1) });
/// let workflow = create_workflow("count", move |run, n: u32| {
///     let add_one = add_one.clone();
///     async move {
///         let n = run.step(&add_one, n).await?;
///         run.step(&add_one, n).await
///     }
/// });
/// let done = workflow.run(&Container::new(), 40).await.unwrap();
/// assert_eq!(done.output, 42);
/// # }
/// ```
pub struct Workflow<I, O> {
    name: Arc<str>,
    body: Body<I, O>,
}

impl<I, O> Clone for Workflow<I, O> {
    fn clone(&self) -> Self {
        Workflow {
            name: Arc::clone(&self.name),
            body: Arc::clone(&self.body),
        }
    }
}

impl<I, O> fmt::Debug for Workflow<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("name", &self.name)
            .finish()
    }
}

/// Defines a workflow (Medusa's `createWorkflow(name, body)`).
pub fn create_workflow<I, O, F, Fut>(name: impl Into<String>, body: F) -> Workflow<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Run, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send + 'static,
{
    let name: String = name.into();
    Workflow {
        name: name.into(),
        body: Arc::new(move |run, input| Box::pin(body(run, input))),
    }
}

/// What a successful run returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput<O> {
    /// The run's id.
    pub run_id: String,
    /// The body's output.
    pub output: O,
}

impl<I: Send + 'static, O: Send + 'static> Workflow<I, O> {
    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the workflow with a fresh run id.
    ///
    /// # Errors
    ///
    /// [`WorkflowError`] when a step (or the body) fails, after the
    /// completed steps were compensated.
    ///
    /// # Panics
    ///
    /// A panic in a step or the body is resumed after the completed steps
    /// were compensated.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the steps completed so far are not
    /// compensated, with one exception: the locks the run's lock steps took
    /// are released in the background (see [`Extension::abandon`](crate::workflow::Extension::abandon)).
    pub async fn run(
        &self,
        container: &Container,
        input: I,
    ) -> Result<RunOutput<O>, WorkflowError> {
        self.run_with_id(container, crate::token::random_id(), input)
            .await
    }

    /// Runs the workflow with the given run id (e.g. a request id).
    ///
    /// # Errors
    ///
    /// As [`Workflow::run`].
    ///
    /// # Panics
    ///
    /// As [`Workflow::run`].
    ///
    /// # Cancel safety
    ///
    /// As [`Workflow::run`].
    pub async fn run_with_id(
        &self,
        container: &Container,
        run_id: impl Into<String>,
        input: I,
    ) -> Result<RunOutput<O>, WorkflowError> {
        let run = Run::root(&self.name, container.clone(), run_id.into());
        let span =
            tracing::debug_span!("lockstep.workflow", workflow = %self.name, run_id = %run.id());
        let unfinished = Unfinished::new(&run);
        let outcome = AssertUnwindSafe((self.body)(run.clone(), input))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        match outcome {
            Ok(Ok(output)) => {
                unfinished.finished();
                Ok(RunOutput {
                    run_id: run.id().to_owned(),
                    output,
                })
            }
            Ok(Err(source)) => {
                let (compensated, mut failures) = run.compensate().instrument(span).await;
                unfinished.finished();
                failures.append(&mut run.take_sub_failures());
                Err(WorkflowError {
                    workflow: self.name.to_string(),
                    run_id: run.id().to_owned(),
                    failed_step: run.failed_step(),
                    compensated,
                    compensation_failures: failures,
                    source,
                })
            }
            Err(panic) => {
                let _ = run.compensate().instrument(span).await;
                unfinished.finished();
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// Running steps and sub-workflows.
impl Run {
    /// Runs one step. On success its compensation (if it returned data for
    /// one) is pushed on the run's stack; on failure the step's error is
    /// returned as is, for the body to propagate with `?`.
    ///
    /// # Errors
    ///
    /// The step's own error.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the step's invoke is dropped with it and
    /// nothing is pushed on the stack: whatever the invoke did is not
    /// compensated. The lock steps are safe to drop: a dropped acquire step
    /// holds nothing, a dropped release step may or may not have released.
    pub async fn step<S: Step>(&self, step: &S, input: S::Input) -> Result<S::Output, StepError> {
        let ctx = StepContext::new(self.clone(), step.name());
        let span = tracing::debug_span!("lockstep.step", workflow = %self.workflow(), run_id = %self.id(), step = %step.name());
        match step.invoke(ctx.clone(), input).instrument(span).await {
            Ok(response) => {
                if let Some(data) = response.compensation {
                    let step = step.clone();
                    let name = step.name().to_owned();
                    self.push_pending(Pending {
                        step: name.clone(),
                        undo: Box::new(move || {
                            Box::pin(async move {
                                step.compensate(ctx, data).await.map_err(|error| {
                                    CompensationErrors(vec![CompensationFailure {
                                        step: name,
                                        error,
                                    }])
                                })
                            })
                        }),
                    });
                }
                Ok(response.output)
            }
            Err(e) => {
                self.set_failed_step(step.name().to_owned());
                Err(e)
            }
        }
    }

    /// Runs `workflow` as a sub-workflow of this run: with its own run id,
    /// the same container, and this run's lock owner (see
    /// [`acquire_lock_step`](crate::workflow::acquire_lock_step)).
    ///
    /// If it fails, its completed steps are compensated at once and its
    /// error is returned. If it succeeds, its compensations join this run's
    /// stack as one entry, so a later failure here undoes them too.
    ///
    /// # Errors
    ///
    /// The sub-workflow's own error.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the sub-workflow's completed steps are not
    /// compensated, but the locks its lock steps took are released in the
    /// background (see [`Extension::abandon`](crate::workflow::Extension::abandon)).
    pub async fn run_sub<I, O>(&self, workflow: &Workflow<I, O>, input: I) -> Result<O, StepError>
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        let child = self.child(&workflow.name);
        let span = tracing::debug_span!("lockstep.workflow", workflow = %workflow.name, run_id = %child.id(), parent = %self.id());
        let unfinished = Unfinished::new(&child);
        let outcome = (workflow.body)(child.clone(), input)
            .instrument(span.clone())
            .await;
        // Dropped during the compensation below, the child's states are
        // let go of too; the parent's, when the parent is dropped.
        match outcome {
            Ok(output) => {
                let pending = child.take_pending();
                if !pending.is_empty() {
                    let name = workflow.name.to_string();
                    self.push_pending(Pending {
                        step: name,
                        undo: Box::new(move || {
                            Box::pin(async move {
                                let (_, failures) = compensate_stack(pending).await;
                                if failures.is_empty() {
                                    Ok(())
                                } else {
                                    Err(CompensationErrors(failures))
                                }
                            })
                        }),
                    });
                }
                // What the sub-workflow's steps keep per run (the locks it
                // took, say) is now this run's.
                self.adopt_extensions(&child);
                unfinished.finished();
                Ok(output)
            }
            Err(e) => {
                let (_, mut failures) = child.compensate().instrument(span).await;
                unfinished.finished();
                failures.append(&mut child.take_sub_failures());
                self.add_sub_failures(&mut failures);
                let failed = child.failed_step().unwrap_or_else(|| "(body)".to_owned());
                self.set_failed_step(format!("{}/{failed}", workflow.name));
                Err(e)
            }
        }
    }
}

/// A failed run: the original error, and what compensation did.
#[derive(Debug)]
pub struct WorkflowError {
    /// The workflow's name.
    pub workflow: String,
    /// The run's id.
    pub run_id: String,
    /// The step that failed, if a step did (not the body itself);
    /// `sub-workflow/step` for a step of a sub-workflow.
    pub failed_step: Option<String>,
    /// The steps compensated, in the order their compensations ran.
    pub compensated: Vec<String>,
    /// Compensations that failed; they are reported here, never swallowed.
    pub compensation_failures: Vec<CompensationFailure>,
    source: StepError,
}

impl WorkflowError {
    /// The original error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The original error, owned.
    pub fn into_error(self) -> StepError {
        self.source
    }

    /// The original error as a [`LockError`], if it is one (for example a
    /// lock step that could not acquire its keys).
    pub fn lock_error(&self) -> Option<&LockError> {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(err) = e {
            if let Some(lock) = err.downcast_ref::<LockError>() {
                return Some(lock);
            }
            e = err.source();
        }
        None
    }
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workflow \"{}\" (run {}) failed",
            self.workflow, self.run_id
        )?;
        if let Some(step) = &self.failed_step {
            write!(f, " at step \"{step}\"")?;
        }
        write!(f, ": {}", self.source)?;
        if !self.compensation_failures.is_empty() {
            write!(
                f,
                "; {} compensation(s) failed:",
                self.compensation_failures.len()
            )?;
            for c in &self.compensation_failures {
                write!(f, " [{}: {}]", c.step, c.error)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for WorkflowError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
