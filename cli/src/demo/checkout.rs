//! The demo's checkout: the charge-customer workflow, its ledger, and one
//! instance's share of the attempts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::workflow::{
    AcquireLockInput, Container, ReleaseLockInput, StepError, Workflow, acquire_lock_step,
    create_step, create_workflow, release_lock_step,
};
use lockstep::{LockError, LockingModule};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::pg_ledger::PgLedger;

/// The parameters every instance shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) instances: usize,
    pub(crate) orders: usize,
    pub(crate) attempts_per_order: usize,
    pub(crate) lock: bool,
    /// The payment provider's latency: the racy window of the charge step.
    pub(crate) charge_ms: u64,
    /// Every n-th order's first charge is declined (0: never), so that the
    /// acquire step's compensation is exercised.
    pub(crate) decline_every: usize,
    pub(crate) lock_timeout_ms: u64,
    pub(crate) ttl_ms: u64,
}

impl Plan {
    /// The (order, attempt) pairs of instance `i`, in order: order k is
    /// attempted by instances k, k+1, ..., k+A-1 (mod N), so each order is
    /// contended by several instances at about the same time.
    pub(crate) fn attempts_of(&self, instance: usize) -> Vec<usize> {
        (0..self.orders)
            .flat_map(|k| {
                (0..self.attempts_per_order)
                    .filter(move |j| (k + j) % self.instances == instance)
                    .map(move |_| k)
            })
            .collect()
    }

    pub(crate) fn total_attempts(&self) -> usize {
        self.orders * self.attempts_per_order
    }

    fn declines(&self, order: usize) -> bool {
        self.decline_every > 0
            && self.attempts_per_order > 1
            && order.is_multiple_of(self.decline_every)
    }
}

pub(crate) fn order_id(k: usize) -> String {
    format!("order_{k:05}")
}

/// Where charges are recorded: a map in this process, or, shared by every
/// process, a hash in Redis or a table in PostgreSQL.
#[derive(Clone)]
pub(crate) enum Ledger {
    Memory(Arc<Mutex<MemoryLedger>>),
    Redis {
        conn: redis::aio::MultiplexedConnection,
        charges: String,
        declined: String,
    },
    Postgres(PgLedger),
}

#[derive(Default)]
pub(crate) struct MemoryLedger {
    charges: HashMap<String, u64>,
    declined: std::collections::HashSet<String>,
}

impl Ledger {
    pub(crate) fn memory() -> Ledger {
        Ledger::Memory(Arc::default())
    }

    /// The ledger of demo run `run` in Redis, under `namespace`.
    pub(crate) fn redis(
        conn: redis::aio::MultiplexedConnection,
        namespace: &str,
        run: &str,
    ) -> Ledger {
        Ledger::Redis {
            conn,
            charges: format!("{namespace}demo:{run}:charges"),
            declined: format!("{namespace}demo:{run}:declined"),
        }
    }

    async fn is_charged(&self, order: &str) -> Result<bool, StepError> {
        Ok(match self {
            Ledger::Memory(m) => m.lock().unwrap().charges.contains_key(order),
            Ledger::Redis { conn, charges, .. } => conn.clone().hexists(charges, order).await?,
            Ledger::Postgres(pg) => pg.is_charged(order).await?,
        })
    }

    async fn record_charge(&self, order: &str) -> Result<(), StepError> {
        match self {
            Ledger::Memory(m) => {
                *m.lock()
                    .unwrap()
                    .charges
                    .entry(order.to_owned())
                    .or_default() += 1
            }
            Ledger::Redis { conn, charges, .. } => {
                let _: i64 = conn.clone().hincr(charges, order, 1).await?;
            }
            Ledger::Postgres(pg) => pg.record_charge(order).await?,
        }
        Ok(())
    }

    /// True for exactly one caller per order.
    async fn decline_once(&self, order: &str) -> Result<bool, StepError> {
        Ok(match self {
            Ledger::Memory(m) => m.lock().unwrap().declined.insert(order.to_owned()),
            Ledger::Redis { conn, declined, .. } => {
                conn.clone().hset_nx(declined, order, 1).await?
            }
            Ledger::Postgres(pg) => pg.decline_once(order).await?,
        })
    }

    /// Charges per order.
    pub(crate) async fn charges(&self) -> Result<HashMap<String, u64>, StepError> {
        Ok(match self {
            Ledger::Memory(m) => m.lock().unwrap().charges.clone(),
            Ledger::Redis { conn, charges, .. } => conn.clone().hgetall(charges).await?,
            Ledger::Postgres(pg) => pg.charges().await?.into_iter().collect(),
        })
    }

    /// Removes the run's record: its keys, or its rows.
    pub(crate) async fn clear(&self) {
        match self {
            Ledger::Memory(_) => {}
            Ledger::Redis {
                conn,
                charges,
                declined,
            } => {
                let _: Result<(), _> = conn.clone().del(&[charges, declined]).await;
            }
            Ledger::Postgres(pg) => {
                let _ = pg.clear().await;
            }
        }
    }
}

/// What one instance saw.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct InstanceStats {
    pub(crate) attempts: u64,
    pub(crate) charged: u64,
    pub(crate) already_charged: u64,
    pub(crate) lock_timeouts: u64,
    pub(crate) declines: u64,
    pub(crate) compensations: u64,
    pub(crate) errors: u64,
    /// Time to acquire each lock that was acquired, in microseconds.
    pub(crate) lock_waits_us: Vec<u64>,
}

impl InstanceStats {
    pub(crate) fn merge(&mut self, other: InstanceStats) {
        self.attempts += other.attempts;
        self.charged += other.charged;
        self.already_charged += other.already_charged;
        self.lock_timeouts += other.lock_timeouts;
        self.declines += other.declines;
        self.compensations += other.compensations;
        self.errors += other.errors;
        self.lock_waits_us.extend(other.lock_waits_us);
    }
}

/// What the charge step reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charge {
    Charged,
    AlreadyCharged,
}

#[derive(Debug, thiserror::Error)]
#[error("card declined for {0}")]
struct Declined(String);

/// The charge-customer workflow: acquire the order's lock (timeout, ttl),
/// charge, release. Without `plan.lock`, the same steps without the locks.
fn charge_customer_workflow(plan: &Plan, waits: Arc<Mutex<Vec<u64>>>) -> Workflow<usize, Charge> {
    let plan = plan.clone();
    let charge_step = {
        let plan = plan.clone();
        create_step("charge-customer", move |ctx, k: usize| {
            let plan = plan.clone();
            async move {
                let ledger: Ledger = ctx.container().resolve("ledger")?;
                let order = order_id(k);
                // Racy by construction: read, pause, write.
                if ledger.is_charged(&order).await? {
                    return Ok(Charge::AlreadyCharged);
                }
                tokio::time::sleep(Duration::from_millis(plan.charge_ms)).await;
                if plan.declines(k) && ledger.decline_once(&order).await? {
                    return Err(Box::new(Declined(order)) as StepError);
                }
                ledger.record_charge(&order).await?;
                Ok(Charge::Charged)
            }
        })
    };
    create_workflow("charge-customer", move |run, k: usize| {
        let (plan, charge_step, waits) = (plan.clone(), charge_step.clone(), Arc::clone(&waits));
        async move {
            let order = order_id(k);
            if plan.lock {
                let started = Instant::now();
                run.step(
                    &acquire_lock_step(),
                    AcquireLockInput::new(order.as_str())
                        .timeout(Duration::from_millis(plan.lock_timeout_ms))
                        .ttl(Duration::from_millis(plan.ttl_ms)),
                )
                .await?;
                waits
                    .lock()
                    .unwrap()
                    .push(started.elapsed().as_micros() as u64);
            }
            let outcome = run.step(&charge_step, k).await?;
            if plan.lock {
                run.step(&release_lock_step(), ReleaseLockInput::new(order.as_str()))
                    .await?;
            }
            Ok(outcome)
        }
    })
}

/// Runs instance `instance`'s attempts one after the other, counting each
/// finished attempt in `progress`.
pub(crate) async fn run_instance(
    plan: &Plan,
    instance: usize,
    locking: LockingModule,
    ledger: Ledger,
    progress: Arc<AtomicU64>,
) -> InstanceStats {
    let waits = Arc::new(Mutex::new(Vec::new()));
    let workflow = charge_customer_workflow(plan, Arc::clone(&waits));
    let container = Container::with_locking(locking).with("ledger", ledger);
    let mut stats = InstanceStats::default();
    for k in plan.attempts_of(instance) {
        stats.attempts += 1;
        match workflow.run(&container, k).await {
            Ok(done) if done.output == Charge::Charged => stats.charged += 1,
            Ok(_) => stats.already_charged += 1,
            Err(e) => {
                stats.compensations += e.compensated.len() as u64;
                if e.error().downcast_ref::<Declined>().is_some() {
                    stats.declines += 1;
                } else if matches!(
                    e.lock_error(),
                    Some(LockError::Contended { .. } | LockError::TimedOut { .. })
                ) {
                    stats.lock_timeouts += 1;
                } else {
                    stats.errors += 1;
                    eprintln!("instance {instance}: {e}");
                }
            }
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
    stats.lock_waits_us = std::mem::take(&mut *waits.lock().unwrap());
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(instances: usize, orders: usize, attempts: usize) -> Plan {
        Plan {
            instances,
            orders,
            attempts_per_order: attempts,
            lock: true,
            charge_ms: 0,
            decline_every: 0,
            lock_timeout_ms: 1000,
            ttl_ms: 1000,
        }
    }

    #[test]
    fn every_order_gets_its_attempts_spread_over_instances() {
        let p = plan(4, 10, 3);
        let mut per_order = vec![0; 10];
        for i in 0..4 {
            for k in p.attempts_of(i) {
                per_order[k] += 1;
            }
        }
        assert_eq!(per_order, vec![3; 10]);
        assert_eq!(p.attempts_of(0), [0, 2, 3, 4, 6, 7, 8]);
        // More attempts than instances: an instance tries an order twice.
        let p = plan(1, 2, 2);
        assert_eq!(p.attempts_of(0), [0, 0, 1, 1]);
    }
}
