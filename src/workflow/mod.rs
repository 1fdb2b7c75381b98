//! A small workflow engine with compensation, and the lock steps.
//!
//! - [`create_workflow`] defines a [`Workflow`]: an async body that runs
//!   steps through its [`Run`] (`run.step(&step, input).await?`). Inputs
//!   are ordinary values built from the workflow input and earlier outputs.
//! - [`create_step`] / [`create_step_with_compensation`] (or the [`Step`]
//!   trait) define steps. When a step fails, the steps completed so far are
//!   compensated in reverse order and the run returns the original error in
//!   a [`WorkflowError`], which also lists any compensation that failed.
//! - A step's [`StepContext`] gives the run id and the [`Container`] it
//!   resolves services from (`ctx.container().locking()`, Medusa's
//!   `container.resolve("locking")`).
//! - [`Run::run_sub`] runs another workflow as a sub-workflow.
//! - [`Run::extension`] keeps per-run state for a family of steps (an
//!   [`Extension`]); the lock steps keep the locks a run took there.
//!
//! Files: `engine.rs` (workflows, running steps and sub-workflows,
//! [`WorkflowError`]), `run.rs` ([`Run`], its compensation stack and
//! extensions), `step.rs` ([`Step`], [`StepContext`]), `container.rs`,
//! `lock_steps.rs`.
//! - [`acquire_lock_step`] and [`release_lock_step`] are Medusa's
//!   `acquireLockStep` and `releaseLockStep`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use lockstep::LockingModule;
//! use lockstep::workflow::*;
//!
//! let charge = create_step("charge-customer", |_ctx, order_id: String| async move {
//!     Ok::<_, StepError>(format!("charged {order_id}"))
//! });
//! let workflow = create_workflow("charge-customer", move |run, order_id: String| {
//!     let charge = charge.clone();
//!     async move {
//!         run.step(&acquire_lock_step(), AcquireLockInput::new(order_id.as_str())
//!             .timeout(Duration::from_secs(2))
//!             .ttl(Duration::from_secs(10))).await?;
//!         let receipt = run.step(&charge, order_id.clone()).await?;
//!         run.step(&release_lock_step(), ReleaseLockInput::new(order_id.as_str())).await?;
//!         Ok(receipt)
//!     }
//! });
//! let container = Container::with_locking(LockingModule::new());
//! let done = workflow.run(&container, "order_1".to_string()).await.unwrap();
//! assert_eq!(done.output, "charged order_1");
//! # }
//! ```

mod container;
mod engine;
mod lock_steps;
mod run;
mod step;

pub use container::{Container, LOCKING, ResolveError};
pub use engine::{RunOutput, Workflow, WorkflowError, create_workflow};
pub use lock_steps::{
    AcquireLockInput, AcquireLockStep, AcquiredLock, DEFAULT_RETRY_INTERVAL, ReleaseLockInput,
    ReleaseLockStep, TakenLocks, acquire_lock_step, release_lock_step,
};
pub use run::{CompensationFailure, Extension, Run};
pub use step::{
    FnStep, Step, StepContext, StepResponse, create_step, create_step_with_compensation,
};

/// The error of a step: any error, boxed.
pub type StepError = Box<dyn std::error::Error + Send + Sync + 'static>;
