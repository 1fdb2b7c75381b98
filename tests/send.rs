//! Every public future of the crate is `Send`, so that it can run in a
//! spawned task (a signal handler shutting the module down, a lock taken
//! in `tokio::spawn`). Compile-time assertions: this file failing to build
//! is the failure.

use std::time::Duration;

use lockstep::workflow::{
    AcquireLockInput, Container, ReleaseLockInput, StepError, acquire_lock_step, create_step,
    create_workflow, release_lock_step,
};
use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, LockingModule, RedisConfig, RedisProvider,
    ReleaseOptions,
};

fn send<T: Send>(_: &T) {}

/// Builds every public future without running it.
#[allow(dead_code, unused_must_use, clippy::let_underscore_future)]
async fn every_public_future_is_send(
    module: LockingModule,
    provider: RedisProvider,
    mut lease: lockstep::Lease,
    run: lockstep::workflow::Run,
) {
    send(&module.acquire("k", AcquireOptions::new()));
    send(&module.release("k", ReleaseOptions::new()));
    send(&module.release_all(ReleaseOptions::new()));
    send(&module.extend("k", ExtendOptions::new(Duration::from_secs(1))));
    send(&module.execute("k", ExecuteOptions::new(), |_held| async { 1 }));
    send(&module.shutdown());
    send(&lease.extend(Duration::from_secs(1)));
    send(&lease.release());
    send(&RedisProvider::connect(RedisConfig::from_url("redis://x")));
    send(&RedisProvider::from_env());
    send(&provider.ping());
    let step = create_step("s", |_ctx, n: u32| async move { Ok::<_, StepError>(n) });
    send(&run.step(&step, 1));
    send(&run.step(&acquire_lock_step(), AcquireLockInput::new("k")));
    send(&run.step(&release_lock_step(), ReleaseLockInput::new("k")));
    let workflow = create_workflow("w", |_run, n: u32| async move { Ok::<_, StepError>(n) });
    send(&run.run_sub(&workflow, 1));
    let container = Container::new();
    send(&workflow.run(&container, 1));
    send(&workflow.run_with_id(&container, "id", 1));
}

/// The module can be shut down from a spawned task.
#[tokio::test]
async fn shutdown_from_a_spawned_task() {
    let module = LockingModule::new();
    let m = module.clone();
    tokio::spawn(async move { m.shutdown().await })
        .await
        .unwrap();
    assert!(module.acquire("k", AcquireOptions::new()).await.is_err());
}
