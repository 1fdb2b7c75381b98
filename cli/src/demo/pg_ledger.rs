//! The demo's ledger in PostgreSQL, for a demo whose locks live there and
//! that was given no Redis: one table, `<schema>.demo_ledger`, in the
//! schema of the locks (`--pg-schema`), one row per order and run.
//!
//! The table is created idempotently by whoever connects first, and stays:
//! other demo runs may be using it at the same moment. A run only ever
//! deletes its own rows (by its run id), as the Redis ledger deletes only
//! its own two hashes.

use std::sync::Arc;
use std::time::Duration;

use lockstep::deadpool_postgres::tokio_postgres::{self, NoTls};
use lockstep::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use lockstep::workflow::StepError;

/// The table's name in the schema.
const TABLE: &str = "demo_ledger";

/// How long connecting, or waiting for a pooled connection, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ledger of one demo run in a PostgreSQL table.
#[derive(Clone)]
pub(crate) struct PgLedger {
    pool: Pool,
    run: String,
    sql: Arc<Sql>,
}

/// The statements, with the table's qualified name substituted.
struct Sql {
    is_charged: String,
    record_charge: String,
    decline_once: String,
    charges: String,
    clear: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        Sql {
            is_charged: format!("SELECT charges > 0 FROM {table} WHERE run = $1 AND order_id = $2"),
            record_charge: format!(
                "INSERT INTO {table} AS l (run, order_id, charges) VALUES ($1, $2, 1) \
                 ON CONFLICT (run, order_id) DO UPDATE SET charges = l.charges + 1"
            ),
            // One row affected for the first caller per order only: the
            // insert, or the update of a row that was not declined yet.
            decline_once: format!(
                "INSERT INTO {table} AS l (run, order_id, declined) VALUES ($1, $2, true) \
                 ON CONFLICT (run, order_id) DO UPDATE SET declined = true WHERE NOT l.declined"
            ),
            charges: format!(
                "SELECT order_id, charges FROM {table} WHERE run = $1 AND charges > 0"
            ),
            clear: format!("DELETE FROM {table} WHERE run = $1"),
        }
    }
}

/// The DDL: the schema (normally there already, made by the provider) and
/// the table, serialised by an advisory lock of the demo's own so that the
/// workers connecting at once do not race on the catalog. Idempotent.
fn ddl(schema: &str, table: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('lockstep-demo-ledger-ddl'));
         CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {table} (
             run      text    NOT NULL,
             order_id text    NOT NULL,
             charges  bigint  NOT NULL DEFAULT 0,
             declined boolean NOT NULL DEFAULT false,
             PRIMARY KEY (run, order_id)
         );"
    )
}

/// `name` as a quoted identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PgLedger {
    /// Connects to the database at `url` and creates the table in `schema`
    /// if it is missing.
    pub(crate) async fn connect(url: &str, schema: &str, run: &str) -> Result<PgLedger, String> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("lockstep-demo-ledger");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // An instance runs one attempt at a time: one connection is enough,
        // a second covers a connection being replaced.
        let pool = Pool::builder(manager)
            .max_size(2)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| e.to_string())?;
        let (schema, table) = (quoted(schema), format!("{}.{TABLE}", quoted(schema)));
        pool.get()
            .await
            .map_err(|e| e.to_string())?
            .batch_execute(&ddl(&schema, &table))
            .await
            .map_err(|e| e.to_string())?;
        Ok(PgLedger {
            pool,
            run: run.to_owned(),
            sql: Arc::new(Sql::new(&table)),
        })
    }

    pub(crate) async fn is_charged(&self, order: &str) -> Result<bool, StepError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.sql.is_charged).await?;
        let row = client.query_opt(&statement, &[&self.run, &order]).await?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    pub(crate) async fn record_charge(&self, order: &str) -> Result<(), StepError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.sql.record_charge).await?;
        client.execute(&statement, &[&self.run, &order]).await?;
        Ok(())
    }

    /// True for exactly one caller per order.
    pub(crate) async fn decline_once(&self, order: &str) -> Result<bool, StepError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.sql.decline_once).await?;
        Ok(client.execute(&statement, &[&self.run, &order]).await? == 1)
    }

    /// Charges per order (orders never charged are left out).
    pub(crate) async fn charges(&self) -> Result<Vec<(String, u64)>, StepError> {
        let client = self.pool.get().await?;
        let rows = client.query(&self.sql.charges, &[&self.run]).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64))
            .collect())
    }

    /// Deletes this run's rows (and nothing else).
    pub(crate) async fn clear(&self) -> Result<u64, StepError> {
        let client = self.pool.get().await?;
        Ok(client.execute(&self.sql.clear, &[&self.run]).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quoted("lockstep"), "\"lockstep\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
        let sql = Sql::new("\"s\".demo_ledger");
        assert!(
            sql.clear
                .starts_with("DELETE FROM \"s\".demo_ledger WHERE run = $1")
        );
    }
}
