//! PostgresConfig, connecting (pool, DDL), and the schema name's checks.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::listen::Listener;
use super::{Inner, PostgresProvider};
use crate::error::ConfigError;
use crate::options::DEFAULT_WAIT_TIMEOUT;

/// The environment variable [`PostgresConfig::from_env`] reads.
pub const ENV_POSTGRES_URL: &str = "LOCKING_POSTGRES_URL";

/// The schema the provider's table and functions live in by default.
pub const DEFAULT_SCHEMA: &str = "lockstep";

const DDL: &str = include_str!("schema.sql");

/// How to reach PostgreSQL, and where the locks live.
///
/// # Deserializing
///
/// With the `serde` feature the struct deserializes from any serde format,
/// with the field names of its builder methods; every field has a default
/// (those of [`from_url`](PostgresConfig::from_url); `url` has none, and
/// connecting fails without it), and
/// durations are either a string with a unit (`"5s"`) or an integer number
/// of milliseconds:
///
/// ```json
/// { "url": "postgres://app@db/shop", "schema": "locks", "statement_timeout": "2s" }
/// ```
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct PostgresConfig {
    pub(crate) url: Option<String>,
    pub(crate) schema: String,
    pub(crate) create_schema: bool,
    #[cfg_attr(
        feature = "serde",
        serde(deserialize_with = "crate::redis::config::de::duration")
    )]
    pub(crate) wait_timeout: Duration,
    #[cfg_attr(
        feature = "serde",
        serde(deserialize_with = "crate::redis::config::de::duration")
    )]
    pub(crate) statement_timeout: Duration,
    #[cfg_attr(
        feature = "serde",
        serde(deserialize_with = "crate::redis::config::de::duration")
    )]
    pub(crate) connect_timeout: Duration,
    pub(crate) pool_size: usize,
    pub(crate) synchronous_commit: bool,
}

/// The defaults, without a URL (the environment is not read).
impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            schema: DEFAULT_SCHEMA.to_owned(),
            create_schema: true,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            pool_size: 16,
            synchronous_commit: true,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url.as_deref().map(redact))
            .field("schema", &self.schema)
            .field("create_schema", &self.create_schema)
            .field("wait_timeout", &self.wait_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_size", &self.pool_size)
            .field("synchronous_commit", &self.synchronous_commit)
            .finish()
    }
}

impl PostgresConfig {
    /// A configuration for the server at `url` (`postgres://user:pass@host:port/db`
    /// or a `key=value` connection string).
    pub fn from_url(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: Some(url.into()),
            ..PostgresConfig::from_env()
        }
    }

    /// A configuration whose URL is `LOCKING_POSTGRES_URL`, if set.
    pub fn from_env() -> Self {
        PostgresConfig {
            url: std::env::var(ENV_POSTGRES_URL)
                .ok()
                .filter(|u| !u.is_empty()),
            ..PostgresConfig::default()
        }
    }

    /// The schema of the table and functions (default `lockstep`):
    /// `[a-z_][a-z0-9_]*`, at most 63 bytes. Providers on the same schema
    /// share their locks.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Whether `connect` creates (or updates) the schema, table, sequence
    /// and functions (default true). The DDL is idempotent.
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// The wait of `execute` when the call sets none (default 5 s).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// How long one statement may take, on the client and (as
    /// `statement_timeout`) on the server (default 5 s). An acquisition
    /// without a reply by then is undone in the background.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How long a new connection may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most pooled connections (default 16), besides the provider's
    /// one LISTEN connection.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Whether each lock operation waits for its commit to reach the disk
    /// (`synchronous_commit` on the provider's own connections; default
    /// **true**: a lock, once acquired, survives a server crash).
    ///
    /// Off, the WAL writer writes the commits within a few hundred
    /// milliseconds instead, and a server *crash* (not a clean restart) can
    /// lose the lock operations of its last moments: a lock taken then is
    /// gone after recovery (its holder's next renewal fails with
    /// `NotOwner`, as after any lost lease), a released one is back until
    /// its lease ends. Fencing tokens still grow: after every server start
    /// the token sequence is floored at the server's clock in microseconds
    /// before any token is handed out. On this project's machine it buys
    /// about 40 % more throughput on a single lock handed between waiters
    /// and 60 % more on multi-key contention; uncontended locks gain less
    /// (concurrent commits share their disk flushes anyway).
    ///
    /// Applies to the pool `connect` builds; a pool given to
    /// [`from_pool`](PostgresProvider::from_pool) keeps its own setting.
    pub fn synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = on;
        self
    }

    /// The parsed connection settings, with the timeouts applied.
    fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let url = self.url.as_deref().ok_or(ConfigError::InvalidSetting {
            name: "url",
            reason: format!("no PostgreSQL URL: set {ENV_POSTGRES_URL} or pass one"),
        })?;
        let mut pg: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| ConfigError::InvalidUrl {
                    url: redact(url),
                    reason: e.to_string(),
                })?;
        pg.connect_timeout(self.connect_timeout);
        pg.options(format!(
            "-c statement_timeout={} -c synchronous_commit={}",
            self.statement_timeout.as_millis().max(1),
            if self.synchronous_commit { "on" } else { "off" }
        ));
        if pg.get_application_name().is_none() {
            pg.application_name("lockstep");
        }
        Ok(pg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        check_schema(&self.schema)?;
        for (name, d) in [
            ("statement_timeout", self.statement_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::InvalidSetting {
                    name,
                    reason: "must be greater than zero".into(),
                });
            }
        }
        if self.pool_size == 0 {
            return Err(ConfigError::InvalidSetting {
                name: "pool_size",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Checks a schema name: `[a-z_][a-z0-9_]*`, at most 63 bytes (PostgreSQL's
/// identifier limit), so that quoting it is all the escaping it needs.
pub(crate) fn check_schema(schema: &str) -> Result<(), ConfigError> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || schema.len() > 63 {
        return Err(ConfigError::InvalidSetting {
            name: "schema",
            reason: format!(
                "{schema:?} is not a schema name of the form [a-z_][a-z0-9_]* of at most 63 bytes"
            ),
        });
    }
    Ok(())
}

/// The names a provider's SQL uses, derived from its (checked) schema.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// The quoted schema identifier.
    pub(crate) schema: String,
}

impl Names {
    pub(crate) fn new(schema: &str) -> Self {
        Names {
            schema: format!("\"{schema}\""),
        }
    }

    /// The DDL with the names substituted.
    pub(crate) fn ddl(&self, raw_schema: &str) -> String {
        DDL.replace("@SCHEMA_LIT@", &format!("'{raw_schema}'"))
            .replace("@SCHEMA@", &self.schema)
    }
}

/// `url` without its password.
pub(crate) fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_owned();
    }
    // key=value form: hide password=...
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl PostgresProvider {
    /// Connects a pool to the server of `config`, checks that it answers
    /// within the connect timeout, creates the schema (unless
    /// `create_schema(false)`) and starts the LISTEN connection.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSetting`] (no URL, a bad schema name),
    /// [`ConfigError::InvalidUrl`], [`ConfigError::Unreachable`] (no answer
    /// within the connect timeout, or the DDL failed),
    /// [`ConfigError::AuthFailed`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves nothing behind: its pool's connections
    /// close, and its LISTEN and sweeping tasks, once started, are aborted
    /// (a schema creation under way commits or rolls back on the server as
    /// a whole).
    pub async fn connect(config: PostgresConfig) -> Result<PostgresProvider, ConfigError> {
        config.check()?;
        let pg = config.pg_config()?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.statement_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| ConfigError::InvalidSetting {
                name: "pool",
                reason: e.to_string(),
            })?;
        PostgresProvider::from_pool(pool, &config).await
    }

    /// A provider on an existing pool (its connections should not set a
    /// `search_path` lockstep depends on: every name is schema-qualified).
    /// The URL of `config` is still needed, for the LISTEN connection.
    ///
    /// # Errors
    ///
    /// As [`connect`](PostgresProvider::connect).
    ///
    /// # Cancel safety
    ///
    /// As [`connect`](PostgresProvider::connect); the pool's connections
    /// close with the last clone of the pool.
    pub async fn from_pool(
        pool: Pool,
        config: &PostgresConfig,
    ) -> Result<PostgresProvider, ConfigError> {
        config.check()?;
        let pg = config.pg_config()?;
        let shown = redact(config.url.as_deref().unwrap_or_default());
        let unreachable =
            |reason: String, source: Option<crate::error::BoxError>| ConfigError::Unreachable {
                url: shown.clone(),
                timeout: config.connect_timeout,
                reason,
                source,
            };
        let names = Names::new(&config.schema);
        let client = match tokio::time::timeout(config.connect_timeout, pool.get()).await {
            Err(_) => return Err(unreachable("no connection in time".into(), None)),
            Ok(Err(deadpool_postgres::PoolError::Backend(e))) => {
                if let Some(db) = e.as_db_error()
                    && db.code().code().starts_with("28")
                {
                    return Err(ConfigError::AuthFailed {
                        url: shown,
                        reason: db.message().to_owned(),
                    });
                }
                return Err(unreachable(e.to_string(), Some(Box::new(e))));
            }
            Ok(Err(e)) => return Err(unreachable(e.to_string(), Some(Box::new(e)))),
            Ok(Ok(c)) => c,
        };
        if config.create_schema {
            let ddl = names.ddl(&config.schema);
            match tokio::time::timeout(config.connect_timeout, client.batch_execute(&ddl)).await {
                Err(_) => {
                    // Whatever it was doing, this connection must not be reused.
                    drop(deadpool_postgres::Object::take(client));
                    return Err(unreachable("the schema's DDL timed out".into(), None));
                }
                Ok(Err(e)) => {
                    return Err(unreachable(
                        format!("creating schema {}: {e}", config.schema),
                        Some(Box::new(e)),
                    ));
                }
                Ok(Ok(())) => {}
            }
        }
        drop(client);
        let inner = Arc::new(Inner::new(pool, &names, config));
        let listener = Listener::start(pg, Arc::clone(&inner)).await;
        Ok(PostgresProvider::assemble(inner, listener))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for ok in ["lockstep", "_x", "a1_b", &"a".repeat(63)] {
            assert!(check_schema(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "A", "a-b", "a\"b", "a b", &"a".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn deserializes_with_defaults() {
        let c: PostgresConfig = serde_json::from_str(
            r#"{"url":"postgres://h/db","schema":"shop","statement_timeout":"2s","pool_size":4,"synchronous_commit":false}"#,
        )
        .unwrap();
        assert_eq!(c.url.as_deref(), Some("postgres://h/db"));
        assert_eq!(c.schema, "shop");
        assert_eq!(c.statement_timeout, Duration::from_secs(2));
        assert_eq!(c.pool_size, 4);
        assert!(!c.synchronous_commit);
        assert_eq!(c.wait_timeout, PostgresConfig::default().wait_timeout);
        assert!(serde_json::from_str::<PostgresConfig>(r#"{"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<PostgresConfig>(r#"{"connect_timeout":"5"}"#).is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
    }
}
