//! The provider contract (`tests/contract/mod.rs`) on the PostgreSQL
//! provider, against a private PostgreSQL (`lockstep_testkit`), each
//! fixture in a schema of its own.

mod contract;
mod support;

use std::sync::Arc;

use contract::{Fixture, Residue, contract_suite};
use lockstep::deadpool_postgres::{Manager, Pool, tokio_postgres};
use lockstep::{LockingModule, PostgresConfig, PostgresProvider};

async fn fixture() -> Fixture {
    let url = support::shared_postgres_url();
    // A schema no other fixture uses, dropped with the fixture.
    let own = Arc::new(support::OwnSchema::new(&url, "lockstep_test"));
    let schema = own.name().to_owned();
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
                let _schema = &own;
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
                            // Live locks, reservations and queue entries
                            // (as "{key}:q", the shape the drop cases look
                            // for). Expired rows are left out: they mean
                            // nothing, and the provider sweeps them away
                            // at moments of its own.
                            &format!(
                                "SELECT key || CASE WHEN reserved_for IS NOT NULL \
                                 THEN ' (reserved)' ELSE '' END FROM {table} \
                                 WHERE expires_at IS NULL OR expires_at > now() \
                                 UNION ALL SELECT '{{' || key || '}}:q' FROM {queue} \
                                 WHERE expires_at > now() ORDER BY 1"
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
