//! `torture` on the PostgreSQL provider: the lock server is a PostgreSQL
//! this command starts (the test kit's `PostgresServer`), restarted by the
//! faults, or one given by URL, never restarted. Either way the workers'
//! connections carry an `application_name` of this run's, so that the
//! faults cut theirs and no one else's, and on a server given by URL the
//! locks live in a schema the run creates and drops.

use std::time::Duration;

use lockstep::deadpool_postgres::tokio_postgres::{self, NoTls};
use lockstep_testkit::PostgresServer;

/// How long the command's own connection may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the locks live.
pub(crate) struct PgLocks {
    /// Ours to restart, or `None` for a server given by URL.
    pub(crate) server: Option<PostgresServer>,
    /// The server's URL, as the command's own connections use it.
    url: String,
    /// The schema of the locks.
    pub(crate) schema: String,
    /// Whether the schema is this run's, to drop at the end.
    owns_schema: bool,
    /// The `application_name` of the workers' connections.
    application: String,
}

impl PgLocks {
    /// A PostgreSQL of our own (the locks in schema `torture`).
    pub(crate) fn spawn(run: &str) -> Result<PgLocks, String> {
        let server = PostgresServer::try_start()?;
        Ok(PgLocks {
            url: server.url(),
            server: Some(server),
            schema: "torture".to_owned(),
            owns_schema: false,
            application: format!("lockstep-torture-{run}"),
        })
    }

    /// The server at `url`, in a fresh schema `lockstep_torture_<run>`
    /// created now (it fails if one by that name exists: never someone
    /// else's).
    pub(crate) async fn shared(url: &str, run: &str) -> Result<PgLocks, String> {
        let schema = format!("lockstep_torture_{run}");
        let locks = PgLocks {
            server: None,
            url: url.to_owned(),
            schema,
            owns_schema: false,
            application: format!("lockstep-torture-{run}"),
        };
        locks
            .client()
            .await?
            .batch_execute(&format!("CREATE SCHEMA {}", locks.schema))
            .await
            .map_err(|e| format!("cannot create schema {}: {e}", locks.schema))?;
        Ok(PgLocks {
            owns_schema: true,
            ..locks
        })
    }

    /// The flags of a worker: the URL with this run's application name,
    /// and the schema.
    pub(crate) fn worker_args(&self) -> Result<Vec<String>, String> {
        Ok(vec![
            "--postgres-url".to_owned(),
            with_application(&self.url, &self.application)?,
            "--pg-schema".to_owned(),
            self.schema.clone(),
        ])
    }

    /// A connection of the command's own (not one the faults cut).
    async fn client(&self) -> Result<tokio_postgres::Client, String> {
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|e| format!("{}: {e}", self.url))?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .application_name("lockstep-torture");
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Ends every backend of the workers (pooled connections and LISTEN
    /// connections alike) with `pg_terminate_backend`: how many.
    pub(crate) async fn terminate_workers(&self) -> Result<u64, String> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                 FROM pg_stat_activity WHERE application_name = $1",
                &[&self.application],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Drops the schema if this run created it.
    pub(crate) async fn drop_schema(&self) -> Result<(), String> {
        if !self.owns_schema {
            return Ok(());
        }
        self.client()
            .await?
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await
            .map_err(|e| format!("cannot drop schema {}: {e}", self.schema))
    }
}

/// `url` with `application_name` set to `name`: a query parameter of a
/// `postgres://` URL, or one more `key=value` of a connection string.
fn with_application(url: &str, name: &str) -> Result<String, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        let kept: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(k, _)| k != "application_name")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        parsed
            .query_pairs_mut()
            .clear()
            .extend_pairs(kept)
            .append_pair("application_name", name);
        Ok(parsed.into())
    } else {
        Ok(format!("{url} application_name={name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::with_application;

    #[test]
    fn the_workers_application_name_replaces_any_other() {
        assert_eq!(
            with_application("postgres://u@h:5/db", "t-1").unwrap(),
            "postgres://u@h:5/db?application_name=t-1"
        );
        assert_eq!(
            with_application(
                "postgresql://u@h/db?sslmode=disable&application_name=x",
                "t"
            )
            .unwrap(),
            "postgresql://u@h/db?sslmode=disable&application_name=t"
        );
        assert_eq!(
            with_application("host=h user=u", "t").unwrap(),
            "host=h user=u application_name=t"
        );
    }
}
