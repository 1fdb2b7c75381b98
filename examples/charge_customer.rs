//! The seed's charge-customer workflow, in both of its forms, run by four
//! concurrent instances over the same orders.
//!
//! 1. `chargeCustomerWorkflow`: `acquire_lock_step` (timeout 2 s, ttl 10 s),
//!    the charge step, `release_lock_step`.
//! 2. A charge step that resolves the Locking Module from its container and
//!    calls `acquire` / `release` itself.
//!
//! The charge is racy by construction (read "already charged?", pause,
//! record the charge): only the lock keeps every order charged once.
//!
//! `cargo run --example charge_customer` uses the in-memory provider; with
//! `LOCKING_REDIS_URL=redis://127.0.0.1:6379` it uses Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::workflow::{
    AcquireLockInput, Container, ReleaseLockInput, StepContext, StepError, Workflow,
    acquire_lock_step, create_step, create_workflow, release_lock_step,
};
use lockstep::{AcquireOptions, LockingModule, RedisProvider, ReleaseOptions};

#[derive(Clone, Debug)]
struct WorkflowInput {
    customer_id: String,
    order_id: String,
}

/// The payment ledger: order id -> charges. A service in the container.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<HashMap<String, u32>>>);

impl Ledger {
    /// Charges unless already charged; racy on purpose: the check and the
    /// write are apart, with the payment provider's latency in between.
    async fn charge(&self, order_id: &str) -> bool {
        let already = self.0.lock().unwrap().contains_key(order_id);
        tokio::time::sleep(Duration::from_millis(2)).await;
        if !already {
            *self
                .0
                .lock()
                .unwrap()
                .entry(order_id.to_owned())
                .or_default() += 1;
        }
        !already
    }
}

async fn charge(ctx: &StepContext, input: &WorkflowInput) -> Result<bool, StepError> {
    let ledger: Ledger = ctx.container().resolve("ledger")?;
    let charged = ledger.charge(&input.order_id).await;
    if charged {
        println!("  charged {} for {}", input.customer_id, input.order_id);
    }
    Ok(charged)
}

/// Form 1: the seed's `chargeCustomerWorkflow`.
fn charge_customer_workflow() -> Workflow<WorkflowInput, bool> {
    let charge_customer_step =
        create_step("charge-customer", |ctx, input: WorkflowInput| async move {
            charge(&ctx, &input).await
        });
    create_workflow("charge-customer", move |run, input: WorkflowInput| {
        let charge_customer_step = charge_customer_step.clone();
        async move {
            run.step(
                &acquire_lock_step(),
                AcquireLockInput::new(input.order_id.as_str())
                    // Attempt to acquire the lock for two seconds before timing out
                    .timeout(Duration::from_secs(2))
                    // Lock is only held for a maximum of ten seconds
                    .ttl(Duration::from_secs(10)),
            )
            .await?;
            let charged = run.step(&charge_customer_step, input.clone()).await?;
            run.step(
                &release_lock_step(),
                ReleaseLockInput::new(input.order_id.as_str()),
            )
            .await?;
            Ok(charged)
        }
    })
}

/// Form 2: a step that resolves the Locking Module and locks by itself.
fn charge_customer_step_workflow() -> Workflow<WorkflowInput, bool> {
    let charge_customer_step =
        create_step("charge-customer", |ctx, input: WorkflowInput| async move {
            let locking_module_service = ctx.container().locking()?;
            let owner = ctx.run_id().to_owned();
            locking_module_service
                .acquire(
                    input.order_id.as_str(),
                    AcquireOptions::new()
                        .owner_id(&owner)
                        // Lock will auto-expire after 10 seconds
                        .expire(Duration::from_secs(10))
                        .timeout(Duration::from_secs(2)),
                )
                .await?;
            let charged = charge(&ctx, &input).await;
            locking_module_service
                .release(
                    input.order_id.as_str(),
                    ReleaseOptions::new().owner_id(&owner),
                )
                .await?;
            charged
        });
    create_workflow("charge-customer-step", move |run, input: WorkflowInput| {
        let step = charge_customer_step.clone();
        async move { run.step(&step, input).await }
    })
}

/// Four instances run `workflow` over the same orders at once.
async fn run_instances(
    name: &str,
    workflow: Workflow<WorkflowInput, bool>,
    locking: &LockingModule,
) -> Result<bool, Box<dyn std::error::Error>> {
    println!("{name}:");
    let ledger = Ledger::default();
    let container = Container::with_locking(locking.clone()).with("ledger", ledger.clone());
    let orders: Vec<String> = (1..=20).map(|i| format!("order_{i}")).collect();
    let mut instances = Vec::new();
    for instance in 1..=4 {
        let (workflow, container, orders) = (workflow.clone(), container.clone(), orders.clone());
        instances.push(tokio::spawn(async move {
            for order_id in orders {
                let input = WorkflowInput {
                    customer_id: format!("cus_{}", order_id.trim_start_matches("order_")),
                    order_id,
                };
                workflow.run(&container, input).await?;
            }
            Ok::<_, lockstep::workflow::WorkflowError>(instance)
        }));
    }
    for instance in instances {
        instance.await??;
    }
    let ledger = ledger.0.lock().unwrap();
    let twice = ledger.values().filter(|n| **n > 1).count();
    println!(
        "  => {} orders, {} charged, {twice} charged twice\n",
        orders.len(),
        ledger.len()
    );
    Ok(twice == 0 && ledger.len() == orders.len())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let locking = match std::env::var("LOCKING_REDIS_URL") {
        Ok(_) => LockingModule::builder()
            .provider("locking-redis", RedisProvider::from_env().await?)
            .build()?,
        Err(_) => LockingModule::new(),
    };
    println!("provider: {}\n", locking.default_provider_id());
    let first = run_instances(
        "chargeCustomerWorkflow (lock steps)",
        charge_customer_workflow(),
        &locking,
    )
    .await?;
    let second = run_instances(
        "chargeCustomerStep (the step locks by itself)",
        charge_customer_step_workflow(),
        &locking,
    )
    .await?;
    locking.shutdown().await;
    if !(first && second) {
        std::process::exit(1);
    }
    Ok(())
}
