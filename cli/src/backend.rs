//! Where the commands lock: one Redis, a Redis Cluster, a master found
//! through Sentinel, or Redlock over independent masters. One set of flags
//! for every command, passed on to the processes a command starts.

use std::sync::Arc;
use std::time::Duration;

use lockstep::provider::LockingProvider;
use lockstep::{
    LockingModule, PostgresConfig, PostgresProvider, RedisConfig, RedisProvider, RedlockProvider,
};

/// Connection flags shared by the commands that talk to Redis.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BackendArgs {
    /// One Redis, e.g. redis://127.0.0.1:6379 (default: $LOCKING_REDIS_URL).
    /// With --sentinel it only supplies the master's credentials.
    #[arg(long, env = "LOCKING_REDIS_URL", value_name = "URL")]
    pub(crate) redis_url: Option<String>,
    /// A Redis Cluster: seed nodes (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_name = "URL", conflicts_with_all = ["sentinels", "redlock"])]
    pub(crate) cluster: Vec<String>,
    /// Sentinels (comma-separated or repeated), with --sentinel-master.
    #[arg(
        long = "sentinel",
        value_delimiter = ',',
        value_name = "URL",
        requires = "sentinel_master",
        conflicts_with = "redlock"
    )]
    pub(crate) sentinels: Vec<String>,
    /// The master's name at the sentinels (`sentinel monitor <name> ...`).
    #[arg(long, value_name = "NAME", requires = "sentinels")]
    pub(crate) sentinel_master: Option<String>,
    /// Redlock: independent masters (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub(crate) redlock: Vec<String>,
    /// Report an acquisition only once N replicas have it (WAIT); not with
    /// --redlock.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        conflicts_with = "redlock"
    )]
    pub(crate) wait_for_replicas: usize,
    /// Key namespace.
    #[arg(long, default_value = lockstep::DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// PostgreSQL instead of Redis, e.g. postgres://user@host/db (the
    /// provider creates its schema if missing).
    #[arg(long, value_name = "URL", conflicts_with_all = ["redis_url", "cluster", "sentinels", "redlock", "wait_for_replicas"])]
    pub(crate) postgres_url: Option<String>,
    /// The schema of --postgres-url's locks.
    #[arg(long, default_value = lockstep::DEFAULT_SCHEMA, value_name = "NAME")]
    pub(crate) pg_schema: String,
    /// With --postgres-url: lock operations commit without waiting for the
    /// disk (synchronous_commit off; a server crash can lose the last
    /// moments' operations, fencing tokens still grow).
    #[arg(long, requires = "postgres_url")]
    pub(crate) pg_async_commit: bool,
}

/// A connected backend.
pub(crate) struct Connected {
    /// A module whose default provider is the backend.
    pub(crate) module: LockingModule,
    /// The Redis provider, except with Redlock (for its round-trip count).
    pub(crate) redis: Option<RedisProvider>,
    /// The PostgreSQL provider (for its statement count).
    pub(crate) postgres: Option<PostgresProvider>,
    /// What it is, for reports: "locking-redis", "locking-redis-cluster", ...
    pub(crate) kind: &'static str,
}

impl BackendArgs {
    /// Whether any Redis was given (the demo runs in memory otherwise).
    pub(crate) fn is_given(&self) -> bool {
        self.postgres_url.is_some()
            || self.redis_url.is_some()
            || !self.cluster.is_empty()
            || !self.sentinels.is_empty()
            || !self.redlock.is_empty()
    }

    /// Whether this is one plain server (`--redis-url` alone).
    pub(crate) fn is_single(&self) -> bool {
        self.cluster.is_empty() && self.sentinels.is_empty() && self.redlock.is_empty()
    }

    /// The provider settings for one server, a cluster or Sentinel.
    fn config(&self) -> Result<RedisConfig, String> {
        let mut config = if !self.cluster.is_empty() {
            RedisConfig::from_cluster(self.cluster.iter().cloned())
        } else if let Some(master) = &self.sentinel_master {
            let mut c = RedisConfig::from_sentinels(self.sentinels.iter().cloned(), master);
            c.url = self.redis_url.clone();
            c
        } else {
            RedisConfig::from_url(self.redis_url.clone().ok_or_else(missing)?)
        };
        config = config.namespace(&self.namespace);
        if self.wait_for_replicas > 0 {
            config = config.wait_for_replicas(self.wait_for_replicas, Duration::from_secs(1));
        }
        Ok(config)
    }

    /// Connects, with `tune` applied to the provider settings.
    pub(crate) async fn connect_with(
        &self,
        tune: impl FnOnce(RedisConfig) -> RedisConfig,
    ) -> Result<Connected, String> {
        if let Some(url) = &self.postgres_url {
            let config = PostgresConfig::from_url(url)
                .schema(&self.pg_schema)
                .synchronous_commit(!self.pg_async_commit);
            let provider = PostgresProvider::connect(config)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(Connected {
                module: module("locking-postgres", Arc::new(provider.clone())),
                redis: None,
                postgres: Some(provider),
                kind: "locking-postgres",
            });
        }
        if !self.redlock.is_empty() {
            let urls: Vec<&str> = self.redlock.iter().map(String::as_str).collect();
            let base = RedisConfig::default().namespace(&self.namespace);
            let provider = RedlockProvider::connect(&urls, tune(base))
                .await
                .map_err(|e| e.to_string())?;
            return Ok(Connected {
                module: module("locking-redlock", Arc::new(provider)),
                redis: None,
                postgres: None,
                kind: "locking-redlock",
            });
        }
        let config = tune(self.config()?);
        let kind = if !self.cluster.is_empty() {
            "locking-redis-cluster"
        } else if self.sentinel_master.is_some() {
            "locking-redis-sentinel"
        } else {
            "locking-redis"
        };
        let provider = RedisProvider::connect(config)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Connected {
            module: module("locking-redis", Arc::new(provider.clone())),
            redis: Some(provider),
            postgres: None,
            kind,
        })
    }

    /// Connects with the default settings.
    pub(crate) async fn connect(&self) -> Result<Connected, String> {
        self.connect_with(|c| c).await
    }

    /// The same flags, for a process this one starts.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(url) = &self.redis_url {
            args.extend(["--redis-url".to_owned(), url.clone()]);
        }
        let lists = [
            ("--cluster", &self.cluster),
            ("--sentinel", &self.sentinels),
            ("--redlock", &self.redlock),
        ];
        for (flag, urls) in lists {
            if !urls.is_empty() {
                args.extend([flag.to_owned(), urls.join(",")]);
            }
        }
        if let Some(master) = &self.sentinel_master {
            args.extend(["--sentinel-master".to_owned(), master.clone()]);
        }
        if self.wait_for_replicas > 0 {
            args.extend([
                "--wait-for-replicas".to_owned(),
                self.wait_for_replicas.to_string(),
            ]);
        }
        args.extend(["--namespace".to_owned(), self.namespace.clone()]);
        if let Some(url) = &self.postgres_url {
            args.extend(["--postgres-url".to_owned(), url.clone()]);
            args.extend(["--pg-schema".to_owned(), self.pg_schema.clone()]);
            if self.pg_async_commit {
                args.push("--pg-async-commit".to_owned());
            }
        }
        args
    }

    /// The servers that hold locks: the server, the cluster's masters, the
    /// master the sentinels name, or the Redlock masters. Looked up now (a
    /// cluster's or Sentinel's view may change). Their URLs keep the
    /// credentials, TLS and database of the URL they were found through.
    pub(crate) async fn data_nodes(&self) -> Result<Vec<Node>, String> {
        if !self.redlock.is_empty() {
            return self.redlock.iter().map(|u| Node::of(u)).collect();
        }
        if !self.cluster.is_empty() {
            let seed = &self.cluster[0];
            return cluster_masters(&self.cluster)
                .await?
                .into_iter()
                .map(|(host, port)| Node::at(seed, &host, port))
                .collect();
        }
        if let Some(master) = &self.sentinel_master {
            for sentinel in &self.sentinels {
                let reply: Result<Vec<String>, _> = async {
                    let mut c = plain(sentinel).await?;
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(master)
                        .query_async(&mut c)
                        .await
                }
                .await;
                if let Ok([host, port]) = reply.as_deref() {
                    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
                    let template = self.redis_url.as_deref().unwrap_or("redis://localhost");
                    return Ok(vec![Node::at(template, host, port)?]);
                }
            }
            return Err(format!("no sentinel knows a master named {master:?}"));
        }
        Ok(vec![Node::of(
            self.redis_url.as_deref().ok_or_else(missing)?,
        )?])
    }
}

/// A server that holds locks.
pub(crate) struct Node {
    /// `host:port`, for reports.
    pub(crate) address: String,
    /// How to connect to it.
    pub(crate) url: String,
}

impl Node {
    fn of(url: &str) -> Result<Node, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        let host = parsed.host_str().ok_or_else(|| format!("{url}: no host"))?;
        Ok(Node {
            address: format!("{host}:{}", parsed.port().unwrap_or(6379)),
            url: url.to_owned(),
        })
    }

    /// The server at `host:port`, reached as `template` says otherwise.
    fn at(template: &str, host: &str, port: u16) -> Result<Node, String> {
        let mut url = url::Url::parse(template).map_err(|e| format!("{template}: {e}"))?;
        url.set_host(Some(host))
            .map_err(|e| format!("{host}: {e}"))?;
        url.set_port(Some(port))
            .map_err(|()| format!("{template}: no port can be set"))?;
        Node::of(url.as_str())
    }
}

/// What to give when no backend was given.
pub(crate) fn missing() -> String {
    "give --redis-url (or LOCKING_REDIS_URL), --cluster, --sentinel with --sentinel-master, --redlock, or --postgres-url"
        .to_owned()
}

fn module(id: &str, provider: Arc<dyn LockingProvider>) -> LockingModule {
    LockingModule::builder()
        .provider_arc(id, provider, true)
        .build()
        .expect("one provider")
}

/// A plain connection to `url`.
pub(crate) async fn plain(
    url: &str,
) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(None);
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The masters (host, port) of the cluster the seed nodes belong to.
async fn cluster_masters(seeds: &[String]) -> Result<Vec<(String, u16)>, String> {
    let mut last = String::from("no seed node");
    for seed in seeds {
        let reply: Result<redis::Value, _> = async {
            let mut c = plain(seed).await?;
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await
        }
        .await;
        let ranges = match reply {
            Ok(redis::Value::Array(ranges)) => ranges,
            Ok(other) => {
                last = format!("{seed}: CLUSTER SLOTS replied {other:?}");
                continue;
            }
            Err(e) => {
                last = format!("{seed}: {e}");
                continue;
            }
        };
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            // [first, last, [host, port, id, ...], replicas...]
            if let redis::Value::Array(r) = range
                && let Some(redis::Value::Array(node)) = r.get(2)
                && let (Some(host), Some(port)) = (node.first(), node.get(1))
                && let (Ok(host), Ok(port)) = (
                    redis::from_redis_value::<String>(host.clone()),
                    redis::from_redis_value::<u16>(port.clone()),
                )
                && !masters.contains(&(host.clone(), port))
            {
                masters.push((host, port));
            }
        }
        masters.sort();
        return Ok(masters);
    }
    Err(last)
}
