//! Cluster clients, and starting a provider on a cluster.

use std::sync::Arc;

use super::Cluster;
use super::shards::{self, Shards};
use crate::error::ConfigError;
use crate::redis::connect::{parse_url, start, tls_setup, withdraw_callback};
use crate::redis::topology::{Deployment, Source, Topology};
use crate::redis::wire::redact_url;
use crate::redis::{RedisConfig, RedisProvider};

impl RedisConfig {
    /// Defaults, on the Redis Cluster these seed nodes belong to (feature
    /// `cluster`; see [`Deployment::Cluster`]).
    #[must_use]
    pub fn from_cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        RedisConfig {
            deployment: Deployment::Cluster {
                nodes: nodes.into_iter().map(Into::into).collect(),
            },
            ..RedisConfig::default()
        }
    }
}

/// How often the cluster connection retries a request by itself.
const CLUSTER_RETRIES: u32 = 6;

/// Connects to the cluster `nodes` belong to: the shared cluster
/// connection, and with notifications the sharded subscriptions on a
/// cluster connection of their own (RESP3, pushed to a channel).
pub(crate) async fn connect(
    nodes: &[String],
    config: &RedisConfig,
) -> Result<RedisProvider, ConfigError> {
    let client = cluster_client(nodes, config)?
        .build()
        .map_err(cluster_error)?;
    let label = format!("the cluster of {}", redact_url(&nodes[0]));
    let provider = start(
        Source::Cluster(Box::new(client)),
        Topology::Cluster(Cluster::default()),
        None,
        config,
        label,
    )
    .await?;
    let Topology::Cluster(cluster) = &provider.inner.topology else {
        unreachable!("built as a cluster just above");
    };
    if let Some(waiting) = &provider.inner.waiting {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let pubsub = cluster_client(nodes, config)?
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()
            .map_err(cluster_error)?;
        let shards = Shards::new(
            pubsub,
            &provider.inner.layout,
            waiting,
            config.connect_timeout,
        );
        let _ = cluster.shards.set(Arc::clone(&shards));
        tokio::spawn(shards::run(
            Arc::downgrade(&shards),
            Arc::clone(waiting),
            rx,
            withdraw_callback(&provider),
        ));
    }
    Ok(provider)
}

/// A redis-rs cluster client builder for the seed `nodes`.
fn cluster_client(
    nodes: &[String],
    config: &RedisConfig,
) -> Result<redis::cluster::ClusterClientBuilder, ConfigError> {
    let infos = nodes
        .iter()
        .map(|url| parse_url(url))
        .collect::<Result<Vec<_>, _>>()?;
    // A `WAIT` for replicas takes up to its own timeout on top: lockstep
    // bounds each call itself (Connections::run_within).
    let mut response_timeout = config.response_timeout;
    if config.replicas > 0 {
        response_timeout += config.replica_timeout;
    }
    let builder = redis::cluster::ClusterClientBuilder::new(infos)
        .connection_timeout(config.connect_timeout)
        .response_timeout(response_timeout)
        // redis-rs retries redirections, TRYAGAIN and lost connections
        // itself; by default up to 16 times, sleeping at least 1.28 s
        // between tries, which would hide a resharding or failover behind
        // "timed out". A few short tries here; waiting calls retry on
        // their own until their deadline (a passing error).
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(5)
        .max_retry_wait(100);
    let pem = tls_setup(&nodes[0], config)?;
    #[cfg(feature = "tls")]
    let builder = match pem {
        Some(pem) => builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }),
        None => builder,
    };
    #[cfg(not(feature = "tls"))]
    let _ = pem;
    Ok(builder)
}

fn cluster_error(e: redis::RedisError) -> ConfigError {
    ConfigError::InvalidSetting {
        name: "cluster nodes",
        reason: e.to_string(),
    }
}
