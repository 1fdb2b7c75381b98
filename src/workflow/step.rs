//! Steps: an invoke and an optional compensation, and what a step sees of
//! its run.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::workflow::StepError;
use crate::workflow::container::Container;
use crate::workflow::run::Run;

/// What a step sees of its run (Medusa's `{ container }` argument and
/// more).
#[derive(Clone, Debug)]
pub struct StepContext {
    run: Run,
    step: Arc<str>,
}

impl StepContext {
    /// The context of step `step` in `run`.
    pub(crate) fn new(run: Run, step: &str) -> Self {
        StepContext {
            run,
            step: step.into(),
        }
    }

    /// The run executing the step.
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        self.run.id()
    }

    /// The step's name.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The run's services: `ctx.container().locking()` is Medusa's
    /// `container.resolve("locking")`.
    pub fn container(&self) -> &Container {
        self.run.container()
    }
}

/// What a step returns: its output, and the data its compensation needs
/// (Medusa's `new StepResponse(output, compensateInput)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResponse<O, C> {
    pub(crate) output: O,
    pub(crate) compensation: Option<C>,
}

impl<O, C> StepResponse<O, C> {
    /// The output, with the data the compensation will receive if a later
    /// step fails.
    pub fn new(output: O, compensate_with: C) -> Self {
        StepResponse {
            output,
            compensation: Some(compensate_with),
        }
    }

    /// The output, with nothing to compensate (the compensation does not
    /// run for this invocation).
    pub fn without_compensation(output: O) -> Self {
        StepResponse {
            output,
            compensation: None,
        }
    }
}

/// One unit of work in a workflow.
///
/// `invoke` does the work; when a later step of the run fails, `compensate`
/// receives the data `invoke` returned in its [`StepResponse`] and undoes
/// the work. Steps are values (cheap to clone), so that a completed step's
/// compensation can outlive the call that ran it.
///
/// Most steps are written with [`create_step`] or
/// [`create_step_with_compensation`]; implement the trait for a step with
/// its own state or configuration.
pub trait Step: Clone + Send + Sync + 'static {
    /// What the step takes.
    type Input: Send + 'static;
    /// What the step gives to the rest of the workflow.
    type Output: Send + 'static;
    /// What the compensation needs to undo the step.
    type Compensation: Send + 'static;

    /// The step's name, used in errors and traces.
    fn name(&self) -> &str;

    /// Does the work. Its response's compensation data, if any, is kept
    /// for [`compensate`](Step::compensate), should a later step fail.
    ///
    /// # Errors
    ///
    /// Whatever the step reports as [`StepError`]. The workflow's body gets
    /// it back from [`Run::step`](crate::workflow::Run::step); passed on
    /// with `?`, as usual, it stops the run: the steps completed before are
    /// compensated in reverse order and the run fails with this error
    /// (nothing of this step is compensated: it did not complete). A body
    /// that handles the error instead carries on.
    ///
    /// # Cancel safety
    ///
    /// The engine drops this future when the run's own future is dropped,
    /// at any of its awaits. Nothing of it is compensated then: a step
    /// whose effects must not outlive a dropped run should make them only
    /// at its last await, or hold them in something that undoes them on
    /// drop (the lock steps do: a dropped acquire step holds nothing).
    fn invoke(
        &self,
        ctx: StepContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<StepResponse<Self::Output, Self::Compensation>, StepError>> + Send;

    /// Undoes the work, given what `invoke` returned for it. The default
    /// does nothing.
    ///
    /// # Errors
    ///
    /// A failure is recorded with the step's name in the failed run's
    /// compensation failures, and the other compensations still run. (When
    /// the body panicked, they run too, and the panic resumes after them.)
    ///
    /// # Cancel safety
    ///
    /// Dropped when the run's future is dropped during compensation: the
    /// compensations not yet run then never run (the locks of the run's
    /// lock steps are still released, in the background).
    fn compensate(
        &self,
        ctx: StepContext,
        data: Self::Compensation,
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        let _ = (ctx, data);
        async { Ok(()) }
    }
}

type InvokeFn<I, O, C> = Arc<
    dyn Fn(StepContext, I) -> BoxFuture<'static, Result<StepResponse<O, C>, StepError>>
        + Send
        + Sync,
>;
type CompensateFn<C> =
    Arc<dyn Fn(StepContext, C) -> BoxFuture<'static, Result<(), StepError>> + Send + Sync>;

/// A step made of closures; see [`create_step`].
pub struct FnStep<I, O, C = ()> {
    name: Arc<str>,
    invoke: InvokeFn<I, O, C>,
    compensate: Option<CompensateFn<C>>,
}

impl<I, O, C> Clone for FnStep<I, O, C> {
    fn clone(&self) -> Self {
        FnStep {
            name: Arc::clone(&self.name),
            invoke: Arc::clone(&self.invoke),
            compensate: self.compensate.clone(),
        }
    }
}

impl<I, O, C> std::fmt::Debug for FnStep<I, O, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnStep")
            .field("name", &self.name)
            .field("compensates", &self.compensate.is_some())
            .finish()
    }
}

/// A step without compensation (Medusa's `createStep(name, invoke)`).
///
/// ```
/// use lockstep::workflow::{create_step, StepError};
/// let double = create_step("double", |_ctx, n: u32| async move { Ok::<_, StepError>(n * 2) });
/// # let _ = double;
/// ```
pub fn create_step<I, O, F, Fut>(name: impl Into<String>, invoke: F) -> FnStep<I, O, ()>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(StepContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send + 'static,
{
    let name: String = name.into();
    FnStep {
        name: name.into(),
        invoke: Arc::new(move |ctx, input| {
            let fut = invoke(ctx, input);
            Box::pin(async move { fut.await.map(StepResponse::without_compensation) })
        }),
        compensate: None,
    }
}

/// A step with a compensation (Medusa's `createStep(name, invoke,
/// compensate)`): `invoke` returns a [`StepResponse`] carrying what
/// `compensate` needs.
pub fn create_step_with_compensation<I, O, C, F, Fut, G, GFut>(
    name: impl Into<String>,
    invoke: F,
    compensate: G,
) -> FnStep<I, O, C>
where
    I: Send + 'static,
    O: Send + 'static,
    C: Send + 'static,
    F: Fn(StepContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<StepResponse<O, C>, StepError>> + Send + 'static,
    G: Fn(StepContext, C) -> GFut + Send + Sync + 'static,
    GFut: Future<Output = Result<(), StepError>> + Send + 'static,
{
    let name: String = name.into();
    FnStep {
        name: name.into(),
        invoke: Arc::new(move |ctx, input| Box::pin(invoke(ctx, input))),
        compensate: Some(Arc::new(move |ctx, data| Box::pin(compensate(ctx, data)))),
    }
}

impl<I, O, C> Step for FnStep<I, O, C>
where
    I: Send + 'static,
    O: Send + 'static,
    C: Send + 'static,
{
    type Input = I;
    type Output = O;
    type Compensation = C;

    fn name(&self) -> &str {
        &self.name
    }

    fn invoke(
        &self,
        ctx: StepContext,
        input: I,
    ) -> impl Future<Output = Result<StepResponse<O, C>, StepError>> + Send {
        (self.invoke)(ctx, input)
    }

    fn compensate(
        &self,
        ctx: StepContext,
        data: C,
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        let compensate = self.compensate.clone();
        async move {
            match compensate {
                Some(f) => f(ctx, data).await,
                None => Ok(()),
            }
        }
    }
}
