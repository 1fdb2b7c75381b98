//! The seed's charge-customer step, run by several instances at once.
//!
//! Each "instance" tries to charge the same orders. The charge is racy by
//! construction (read "already charged?", pause, record the charge), so only
//! the lock keeps every order charged exactly once. The step resolves the
//! Locking Module and calls `acquire` / `release` itself, as in the seed's
//! second form:
//!
//! ```text
//! await lockingModuleService.acquire(input.order_id, { expire: 10 })
//! // charge customer
//! await lockingModuleService.release(input.order_id)
//! ```
//!
//! Run it with `cargo run --example charge_customer` (in-memory provider), or
//! with `LOCKING_REDIS_URL=redis://127.0.0.1:6379` to use Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::{AcquireOptions, LockingModule, RedisProvider, ReleaseOptions};

/// The payment ledger: order id -> number of charges.
type Ledger = Arc<Mutex<HashMap<String, u32>>>;

/// The seed's `chargeCustomerStep`: lock the order, charge unless already
/// charged, unlock.
async fn charge_customer_step(
    locking: &LockingModule,
    ledger: &Ledger,
    order_id: &str,
    instance: &str,
) -> Result<bool, lockstep::LockError> {
    locking
        .acquire(
            order_id,
            AcquireOptions::new()
                .owner_id(instance)
                .expire(Duration::from_secs(10))
                .timeout(Duration::from_secs(2)),
        )
        .await?;
    let already = ledger.lock().unwrap().contains_key(order_id);
    tokio::time::sleep(Duration::from_millis(2)).await; // the payment provider's latency
    if !already {
        *ledger
            .lock()
            .unwrap()
            .entry(order_id.to_owned())
            .or_default() += 1;
    }
    locking
        .release(order_id, ReleaseOptions::new().owner_id(instance))
        .await?;
    Ok(!already)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let locking = match std::env::var("LOCKING_REDIS_URL") {
        Ok(_) => LockingModule::builder()
            .provider("locking-redis", RedisProvider::from_env().await?)
            .build()?,
        Err(_) => LockingModule::new(),
    };
    println!("provider: {}", locking.default_provider_id());
    let ledger: Ledger = Arc::default();
    let orders: Vec<String> = (1..=50).map(|i| format!("order_{i}")).collect();
    let mut tasks = Vec::new();
    for instance in 1..=4 {
        let (locking, ledger, orders) = (locking.clone(), Arc::clone(&ledger), orders.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("instance-{instance}");
            let mut charged = 0;
            for order in &orders {
                if charge_customer_step(&locking, &ledger, order, &name).await? {
                    charged += 1;
                }
            }
            Ok::<_, lockstep::LockError>(charged)
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        println!("instance-{} charged {} orders", i + 1, task.await??);
    }
    let (charged, double) = {
        let ledger = ledger.lock().unwrap();
        (ledger.len(), ledger.values().filter(|n| **n > 1).count())
    };
    println!(
        "{} orders, {charged} charged, {double} charged twice",
        orders.len()
    );
    locking.shutdown().await;
    if double > 0 || charged != orders.len() {
        std::process::exit(1);
    }
    Ok(())
}
