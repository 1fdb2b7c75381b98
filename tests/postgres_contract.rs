//! The provider contract (`tests/contract/mod.rs`) on the PostgreSQL
//! provider, against a private PostgreSQL (`lockstep_testkit`), each
//! fixture in a schema of its own.

mod contract;
mod support;

use std::sync::Arc;

use contract::{Fixture, Residue, contract_suite};
use lockstep::deadpool_postgres::{Manager, Pool, tokio_postgres};
use lockstep::{LockingModule, PostgresConfig, PostgresProvider};

/// A schema no other fixture uses.
fn unique_schema() -> String {
    format!("lockstep_test_{}", uuid_simple())
}

fn uuid_simple() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(N.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

async fn fixture() -> Fixture {
    let url = support::shared_postgres_url();
    let schema = unique_schema();
    let connect = || async {
        PostgresProvider::connect(PostgresConfig::from_url(&url).schema(&schema))
            .await
            .expect("connect to the test PostgreSQL")
    };
    let provider = connect().await;
    // The peer has its own pool and LISTEN connection, as another process.
    let peer_provider = connect().await;
    let module = |p: PostgresProvider| {
        LockingModule::builder()
            .default_provider("locking-postgres", p)
            .build()
            .expect("valid module")
    };
    // The residue's own pool, to read the table.
    let pg: tokio_postgres::Config = url.parse().unwrap();
    let pool = Pool::builder(Manager::new(pg, tokio_postgres::NoTls))
        .max_size(2)
        .build()
        .unwrap();
    let providers = [provider.clone(), peer_provider.clone()];
    let (table, queue) = (format!("\"{schema}\".locks"), format!("\"{schema}\".queue"));
    Fixture {
        module: module(provider.clone()),
        peer: module(peer_provider),
        provider: Arc::new(provider),
        residue: Residue {
            local: Arc::new(move || {
                providers
                    .iter()
                    .map(|p| p.waiting_keys() + p.pending_undos())
                    .sum()
            }),
            stored: Arc::new(move || {
                let (pool, table, queue) = (pool.clone(), table.clone(), queue.clone());
                Box::pin(async move {
                    let client = pool.get().await.expect("residue connection");
                    let rows = client
                        .query(
                            // Locks, reservations and queue entries (as
                            // "{key}:q", the shape the drop cases look for).
                            &format!(
                                "SELECT key || CASE WHEN reserved_for IS NOT NULL \
                                 THEN ' (reserved)' ELSE '' END \
                                 || CASE WHEN expires_at <= now() \
                                 THEN ' (expired)' ELSE '' END FROM {table} \
                                 UNION ALL SELECT '{{' || key || '}}:q' || CASE \
                                 WHEN expires_at <= now() THEN ' (expired)' ELSE '' END \
                                 FROM {queue} ORDER BY 1"
                            ),
                            &[],
                        )
                        .await
                        .expect("read the locks table");
                    rows.iter().map(|r| r.get::<_, String>(0)).collect()
                })
            }),
        },
        fifo: true,
    }
}

contract_suite!(fixture);
