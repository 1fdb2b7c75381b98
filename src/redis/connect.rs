//! Starting a provider: the settings checked, the URL parsed (with TLS),
//! the pool built, then within the connect timeout the first connection,
//! a PING, the scripts loaded and the notification subscription up.

use std::sync::Arc;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::AsyncConnectionConfig;

use super::config::{ENV_URL, RedisConfig};
use super::connection::Connections;
use super::error::{RawError, is_auth_error};
use super::layout::Layout;
use super::topology::{Source, Topology};
use super::waiting::{self, Entry, Waiting, Withdrawal};
use super::wire::redact_url;
use super::{Inner, RedisProvider};
use crate::error::ConfigError;

/// A provider for one server at `config.url`, without any I/O: with
/// `notifications` (and `config.notifications`) it will subscribe when
/// [`start`]ed, without them its waiters poll. Also what a Redlock set
/// makes of each master (it must be usable while some are down). Returns
/// the redis-rs client that the subscription connects with.
pub(crate) fn single(
    config: &RedisConfig,
    notifications: bool,
) -> Result<(RedisProvider, redis::Client), ConfigError> {
    let (pool, client, url) = pool_for(config)?;
    let waiting =
        (notifications && config.notifications).then(|| Waiting::new(&config.namespace, false));
    let provider = build(Source::single(pool), Topology::Single, config, url, waiting);
    Ok((provider, client))
}

/// The pool and client for `config.url`, without any I/O.
fn pool_for(config: &RedisConfig) -> Result<(Pool, redis::Client, String), ConfigError> {
    config.check()?;
    let url = config
        .url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
        .ok_or(ConfigError::MissingUrl { env: ENV_URL })?;
    let client = client_for(url, config)?;
    let pool = pool_from(client.get_connection_info().clone(), config, url)?;
    Ok((pool, client, redact_url(url)))
}

/// A pool of connections to `info`, with `config`'s timeouts and size.
pub(crate) fn pool_from(
    info: redis::ConnectionInfo,
    config: &RedisConfig,
    url: &str,
) -> Result<Pool, ConfigError> {
    let connection_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout));
    let manager =
        Manager::new_with_config(info, connection_config).map_err(|e| ConfigError::InvalidUrl {
            url: redact_url(url),
            reason: e.to_string(),
        })?;
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.response_timeout))
        .build()
        .map_err(|e| ConfigError::InvalidSetting {
            name: "pool",
            reason: e.to_string(),
        })
}

/// The provider, before any I/O.
fn build(
    source: Source,
    topology: Topology,
    config: &RedisConfig,
    url: String,
    waiting: Option<Arc<Waiting>>,
) -> RedisProvider {
    RedisProvider {
        inner: Arc::new(Inner {
            conns: Connections::new(source, config.connect_timeout, config.response_timeout),
            topology,
            layout: Layout::new(&config.namespace),
            wait_timeout: config.wait_timeout,
            url,
            waiting,
            fair: config.fair,
            claim_ms: (2 * config.response_timeout.as_millis() as u64).max(200),
            response_timeout: config.response_timeout,
            fallback: config.wait_fallback,
            replicas: (config.replicas, config.replica_timeout),
            client: std::sync::RwLock::new(None),
            moved: Arc::new(tokio::sync::Notify::new()),
        }),
    }
}

/// Builds a provider on `source` and starts it: within the connect
/// timeout, the first connection, a PING (its error is the one reported:
/// NOAUTH, WRONGPASS), the scripts loaded, and, with a `client` for one
/// server and notifications on, the process's subscription. On a cluster
/// the caller sets up the sharded subscriptions (see `cluster/client.rs`).
pub(crate) async fn start(
    source: Source,
    topology: Topology,
    client: Option<redis::Client>,
    config: &RedisConfig,
    url: String,
) -> Result<RedisProvider, ConfigError> {
    let notified = client.is_some() || source.is_cluster();
    let waiting = (config.notifications && notified)
        .then(|| Waiting::new(&config.namespace, source.is_cluster()));
    let provider = build(source, topology, config, url, waiting);
    provider.start_io(client, config).await?;
    Ok(provider)
}

impl RedisProvider {
    /// The startup I/O of [`start`], for a provider built without it.
    pub(crate) async fn start_io(
        &self,
        client: Option<redis::Client>,
        config: &RedisConfig,
    ) -> Result<(), ConfigError> {
        let unreachable =
            |reason: String, source: Option<redis::RedisError>| ConfigError::Unreachable {
                url: self.inner.url.clone(),
                timeout: config.connect_timeout,
                reason,
                source: source.map(|e| Box::new(e) as _),
            };
        let startup = async {
            let (_, mut conn) = self.inner.conns.get().await?;
            // PING alone first: its error (NOAUTH, WRONGPASS) is the one
            // to report, not a pipeline's summary of it.
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(RawError::Redis)?;
            let functions = conn
                .load_scripts(config.functions)
                .await
                .map_err(RawError::Redis)?;
            self.inner
                .conns
                .functions
                .store(functions, std::sync::atomic::Ordering::Relaxed);
            *self.inner.client.write().unwrap_or_else(|e| e.into_inner()) = client.clone();
            if let (Some(waiting), Some(_)) = (&self.inner.waiting, client) {
                self.subscribe(waiting, config).await?;
            }
            Ok(())
        };
        match tokio::time::timeout(config.connect_timeout, startup).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(RawError::Redis(e))) if is_auth_error(&e) => Err(ConfigError::AuthFailed {
                url: self.inner.url.clone(),
                reason: e.to_string(),
            }),
            Ok(Err(RawError::Redis(e))) => Err(unreachable(e.to_string(), Some(e))),
            Ok(Err(RawError::Connect(reason, source))) => Err(unreachable(reason, source)),
            Ok(Err(RawError::Closed)) => Err(unreachable("the pool is closed".into(), None)),
            Err(_) => Err(unreachable(
                format!("no answer within {:?}", config.connect_timeout),
                None,
            )),
        }
    }

    /// Starts the subscription task on the current master's client and
    /// waits until it is subscribed.
    async fn subscribe(
        &self,
        waiting: &Arc<Waiting>,
        config: &RedisConfig,
    ) -> Result<(), RawError> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let current = Arc::downgrade(&self.inner);
        tokio::spawn(waiting::subscription::subscribe(
            move || {
                let inner = current.upgrade()?;
                inner
                    .client
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            },
            Arc::clone(&self.inner.moved),
            Arc::clone(waiting),
            config.connect_timeout,
            ready_tx,
            withdraw_callback(self),
        ));
        match ready_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RawError::Redis(e)),
            Err(_) => Err(RawError::Connect(
                "the subscription task ended".into(),
                None,
            )),
        }
    }
}

/// What a subscription does with a lock reserved for this process that
/// nobody here wants any more: passes it on, in a task of its own.
pub(crate) fn withdraw_callback(
    provider: &RedisProvider,
) -> impl Fn(String, Arc<Withdrawal>) + Send + 'static {
    let weak = Arc::downgrade(&provider.inner);
    move |key, ticket| {
        if let Some(inner) = weak.upgrade() {
            RedisProvider { inner }.withdraw_later(key, Entry::Handoff, ticket);
        }
    }
}

/// A redis-rs client for `url`: its connection info (with TLS settings)
/// feeds the pool, and it opens the subscription.
pub(crate) fn client_for(url: &str, config: &RedisConfig) -> Result<redis::Client, ConfigError> {
    let info = parse_url(url)?;
    let invalid = |reason: String| ConfigError::InvalidUrl {
        url: redact_url(url),
        reason,
    };
    let pem = tls_setup(url, config)?;
    #[cfg(feature = "tls")]
    if let Some(pem) = pem {
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        return redis::Client::build_with_tls(info, certificates)
            .map_err(|e| invalid(e.to_string()));
    }
    #[cfg(not(feature = "tls"))]
    let _ = pem;
    redis::Client::open(info).map_err(|e| invalid(e.to_string()))
}

/// Checks `config.tls_root_cert` against `url` (it needs `rediss://`), gets
/// rustls ready for a `rediss://` URL, and returns the private CA, read.
pub(crate) fn tls_setup(url: &str, config: &RedisConfig) -> Result<Option<Vec<u8>>, ConfigError> {
    let tls = url.starts_with("rediss://");
    if !tls {
        return match config.tls_root_cert {
            Some(_) => Err(ConfigError::InvalidSetting {
                name: "tls_root_cert",
                reason: "is only used with rediss:// URLs".into(),
            }),
            None => Ok(None),
        };
    }
    // redis-rs's rustls comes without a crypto provider: install ring's
    // (a no-op if the application installed one first).
    #[cfg(feature = "tls")]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(path) = &config.tls_root_cert else {
        return Ok(None);
    };
    std::fs::read(path)
        .map(Some)
        .map_err(|e| ConfigError::InvalidSetting {
            name: "tls_root_cert",
            reason: format!("cannot read {}: {e}", path.display()),
        })
}

/// Checks a URL's scheme and syntax, with errors that never show the password.
pub(crate) fn parse_url(url: &str) -> Result<redis::ConnectionInfo, ConfigError> {
    use redis::IntoConnectionInfo;
    let invalid = |reason: String| ConfigError::InvalidUrl {
        url: redact_url(url),
        reason,
    };
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "redis+unix" | "unix" => {}
        "rediss" if cfg!(feature = "tls") => {}
        "rediss" => {
            return Err(invalid(
                "rediss:// (TLS) needs lockstep's `tls` cargo feature".into(),
            ));
        }
        _ if !url.contains("://") => {
            return Err(invalid("expected redis://host[:port][/db]".into()));
        }
        other => {
            return Err(invalid(format!(
                "unsupported scheme {other:?}; use redis://, rediss:// or redis+unix://"
            )));
        }
    }
    url.into_connection_info().map_err(|e| {
        // redis-rs messages describe the problem, not the URL; drop any
        // detail that might echo it anyway.
        let reason = e.to_string();
        if reason.contains(url) {
            invalid("the URL does not parse".into())
        } else {
            invalid(reason)
        }
    })
}
