//! Redis Sentinel (feature `sentinel`): find the master through the
//! sentinels, and follow it through failovers.
//!
//! The provider asks the sentinels for the master's address at startup.
//! Then a task keeps following it: it listens for `+switch-master` on one
//! sentinel (trying the next when one fails), and asks for the address
//! again every second, which also catches an event missed while no
//! sentinel could be heard. When the master moves, the provider's pool and
//! subscription are pointed at the new one: writes stop going to a demoted
//! master within about a second of its demotion.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::time::timeout;

use super::connect::{parse_url, pool_from, start};
use super::connection::Connections;
use super::topology::{Deployment, Source, Topology};
use super::wire::redact_url;
use super::{Inner, RedisConfig, RedisProvider};
use crate::error::ConfigError;

/// How often the follower asks the sentinels where the master is.
const LOOKUP_EVERY: Duration = Duration::from_secs(1);

impl RedisConfig {
    /// Defaults, with the master `master` found through `sentinels`
    /// (feature `sentinel`; see [`Deployment::Sentinel`]).
    #[must_use]
    pub fn from_sentinels<S: Into<String>>(
        sentinels: impl IntoIterator<Item = S>,
        master: impl Into<String>,
    ) -> Self {
        RedisConfig {
            deployment: Deployment::Sentinel {
                sentinels: sentinels.into_iter().map(Into::into).collect(),
                master: master.into(),
            },
            ..RedisConfig::default()
        }
    }
}

/// Connects to the master that `sentinels` name `master`, and follows it.
pub(super) async fn connect(
    sentinels: &[String],
    master: &str,
    config: &RedisConfig,
) -> Result<RedisProvider, ConfigError> {
    let (host, port) = lookup(sentinels, master, config.connect_timeout)
        .await
        .map_err(|reason| ConfigError::Unreachable {
            url: format!("the sentinels of {master}"),
            timeout: config.connect_timeout,
            reason,
            source: None,
        })?;
    let (pool, client) = target(config, &host, port)?;
    let provider = start(
        Source::single(pool),
        Topology::Single,
        Some(client),
        config,
        describe(master, &host, port),
    )
    .await?;
    tokio::spawn(follow(
        Arc::downgrade(&provider.inner),
        config.clone(),
        sentinels.to_vec(),
        master.to_owned(),
        (host, port),
    ));
    Ok(provider)
}

fn describe(master: &str, host: &str, port: u16) -> String {
    format!("Sentinel master {master} at {host}:{port}")
}

/// The master's address according to the first sentinel that answers.
async fn lookup(
    sentinels: &[String],
    master: &str,
    limit: Duration,
) -> Result<(String, u16), String> {
    let mut reasons = Vec::new();
    for url in sentinels {
        let ask = async {
            let mut c = redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async::<Option<(String, u16)>>(&mut c)
                .await
        };
        match timeout(limit, ask).await {
            Ok(Ok(Some(addr))) => return Ok(addr),
            Ok(Ok(None)) => reasons.push(format!("{} does not know {master}", redact_url(url))),
            Ok(Err(e)) => reasons.push(format!("{}: {e}", redact_url(url))),
            Err(_) => reasons.push(format!("{}: no answer within {limit:?}", redact_url(url))),
        }
    }
    Err(reasons.join("; "))
}

/// A pool and a client for the master at `host:port`, with the credentials
/// and database of `config.url` if it has any.
fn target(
    config: &RedisConfig,
    host: &str,
    port: u16,
) -> Result<(deadpool_redis::Pool, redis::Client), ConfigError> {
    let addr = ConnectionAddr::Tcp(host.to_owned(), port);
    let info = match config.url.as_deref() {
        Some(url) => parse_url(url)?.set_addr(addr),
        None => addr
            .into_connection_info()
            .map_err(|e| ConfigError::InvalidSetting {
                name: "sentinel_master",
                reason: e.to_string(),
            })?,
    };
    let label = format!("redis://{host}:{port}");
    let client = redis::Client::open(info.clone()).map_err(|e| ConfigError::InvalidUrl {
        url: label.clone(),
        reason: e.to_string(),
    })?;
    let pool = pool_from(info, config, &label)?;
    Ok((pool, client))
}

/// Follows the master until the provider is dropped or shut down.
async fn follow(
    inner: Weak<Inner>,
    config: RedisConfig,
    sentinels: Vec<String>,
    master: String,
    mut current: (String, u16),
) {
    let mut next = 0usize;
    loop {
        let url = &sentinels[next % sentinels.len()];
        next += 1;
        let subscription = async {
            let (mut sink, stream) = redis::Client::open(url.as_str())?
                .get_async_pubsub()
                .await?
                .split();
            sink.subscribe("+switch-master").await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let Ok(Ok((_sink, mut stream))) = timeout(config.connect_timeout, subscription).await
        else {
            if !alive(&inner) {
                return;
            }
            tokio::time::sleep(LOOKUP_EVERY).await;
            continue;
        };
        let mut tick = tokio::time::interval(LOOKUP_EVERY);
        loop {
            let moved_to = tokio::select! {
                message = stream.next() => match message {
                    // "<name> <old ip> <old port> <new ip> <new port>"
                    Some(m) => {
                        let text: String = m.get_payload().unwrap_or_default();
                        let parts: Vec<&str> = text.split_whitespace().collect();
                        match parts.as_slice() {
                            [name, _, _, ip, port] if *name == master => port.parse().ok().map(|p| (ip.to_string(), p)),
                            _ => None,
                        }
                    }
                    None => break, // this sentinel is gone: try the next
                },
                _ = tick.tick() => {
                    if !alive(&inner) {
                        return;
                    }
                    lookup(&sentinels, &master, config.connect_timeout).await.ok()
                }
            };
            if let Some(addr) = moved_to.filter(|a| *a != current) {
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                match target(&config, &addr.0, addr.1) {
                    Ok((pool, client)) => {
                        tracing::info!(
                            master = %master,
                            from = %format!("{}:{}", current.0, current.1),
                            to = %format!("{}:{}", addr.0, addr.1),
                            "Sentinel failover: following the new master"
                        );
                        inner.conns.retarget(pool);
                        *inner.client.write().unwrap_or_else(|e| e.into_inner()) = Some(client);
                        // A permit, not a broadcast: the subscription task
                        // may be busy with a message or its PING right now,
                        // and must still follow once it looks again.
                        inner.moved.notify_one();
                        if let Some(w) = &inner.waiting {
                            // Whatever was queued on the old master is gone.
                            w.wake_all();
                        }
                        current = addr;
                    }
                    Err(e) => tracing::warn!("cannot follow the new master of {master}: {e}"),
                }
            }
        }
    }
}

/// Whether the provider still exists and is not shut down.
fn alive(inner: &Weak<Inner>) -> bool {
    inner
        .upgrade()
        .is_some_and(|i: Arc<Inner>| !i.conns.is_closed())
}

impl Connections {
    /// Points every later call at `pool` (a new master): the shared
    /// connection is dropped (its calls in flight finish or fail alone) and
    /// the old pool closed.
    fn retarget(&self, pool: deadpool_redis::Pool) {
        let Some(current) = self.source.pool_slot() else {
            return;
        };
        let old = std::mem::replace(
            &mut *current.write().unwrap_or_else(|e| e.into_inner()),
            pool,
        );
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        old.close();
    }
}
