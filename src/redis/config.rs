//! Configuration of the Redis provider: from code, from a deserialized
//! struct, or from the environment.

use std::time::Duration;

use super::layout::check_namespace;
use super::topology::Deployment;
use super::wire::redact_url;
use crate::error::ConfigError;
use crate::options::{DEFAULT_WAIT_TIMEOUT, MAX_DURATION};

/// The environment variable holding the Redis URL (Medusa's docs convention).
pub const ENV_URL: &str = "LOCKING_REDIS_URL";

/// The default key namespace.
pub const DEFAULT_NAMESPACE: &str = "lockstep:";

/// Settings of a [`RedisProvider`](crate::RedisProvider).
///
/// # Connection parameters
///
/// The URL follows redis-rs:
/// `redis://[<user>][:<password>@]<host>[:<port>][/<db>]`, `rediss://...` for
/// TLS (cargo feature `tls`), or `redis+unix:///path/to/socket`. A password
/// never appears in lockstep's errors or logs.
///
/// # From the environment
///
/// [`RedisConfig::from_env`] reads `LOCKING_REDIS_URL` (required) and,
/// when set, `LOCKING_REDIS_NAMESPACE`, `LOCKING_REDIS_WAIT_TIMEOUT`,
/// `LOCKING_REDIS_CONNECT_TIMEOUT`, `LOCKING_REDIS_RESPONSE_TIMEOUT` (with a
/// unit: `250ms`, `5s`, `1m`) and `LOCKING_REDIS_POOL_SIZE`.
///
/// # Deserializing
///
/// With the `serde` feature the struct deserializes from any serde format;
/// every field has a default (`url` has none: [`RedisProvider::connect`](crate::RedisProvider::connect)
/// to one server fails without it; a Cluster or Sentinel deployment names
/// its nodes instead), and durations are either a string with
/// a unit (`"5s"`) or an integer number of milliseconds:
///
/// ```json
/// { "url": "redis://127.0.0.1:6379", "namespace": "shop:", "wait_timeout": "2s" }
/// ```
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RedisConfig {
    /// The Redis URL. Required by [`RedisProvider::connect`](crate::RedisProvider::connect);
    /// optional with [`RedisProvider::from_pool`](crate::RedisProvider::from_pool), where it
    /// only serves the release notifications' own connection (without it,
    /// waiters poll; a malformed one is an error).
    pub url: Option<String>,
    /// Prefix of every Redis key lockstep writes (default `lockstep:`). Two
    /// namespaces on one Redis never see each other's locks.
    pub namespace: String,
    /// How long `execute` waits for its locks when the call sets no
    /// timeout (default 5 s, Medusa's `waitLockingTimeout`).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "de::duration"))]
    pub wait_timeout: Duration,
    /// How long connecting (TCP, TLS, AUTH) may take (default 2 s).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "de::duration"))]
    pub connect_timeout: Duration,
    /// How long a reply may take before the call fails with an "outcome
    /// unknown" error (default 1 s). Keep it well below your leases: a
    /// renewal that is not answered within the lease counts as lost.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "de::duration"))]
    pub response_timeout: Duration,
    /// Size of the connection pool lockstep creates (default 8). Lock
    /// operations share one multiplexed connection; the pool supplies it and
    /// its replacements.
    pub pool_size: usize,
    /// Whether waiters are woken by releases through a subscription (one
    /// extra connection per provider; default true). Without it, waiters
    /// poll with a jittered backoff of 5-100 ms.
    pub notifications: bool,
    /// Whether waiters are served in arrival order (default true): a
    /// released lock is handed to the next queued waiter. With `false`
    /// (barging), a release wakes the waiters and whoever retries first
    /// wins, newcomers included.
    pub fair: bool,
    /// How long a waiter waits at most without news before trying again,
    /// when notifications are on (default 1 s): a safety net only, since
    /// releases, lease expiries and reconnects wake waiters by themselves.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "de::duration"))]
    pub wait_fallback: Duration,
    /// How many replicas must have acknowledged an acquisition before it
    /// is reported (`WAIT`; default 0: none). An acquisition that does not
    /// reach them within `replica_timeout` is released and fails with
    /// [`BackendErrorKind::NotReplicated`](crate::BackendErrorKind::NotReplicated).
    /// This closes the window in which a failover to a replica that had not
    /// yet received the lock would let a second holder in; it costs a
    /// replica round trip per acquisition, and a connection of the pool per
    /// acquisition instead of the shared one (the `WAIT` must follow the
    /// write on one client).
    pub replicas: usize,
    /// How long an acquisition waits for its replicas (default 1 s).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "de::duration"))]
    pub replica_timeout: Duration,
    /// Where the servers are: one server at `url` (the default), a Redis
    /// Cluster (feature `cluster`, `RedisConfig::from_cluster`) or a
    /// Sentinel-managed master (feature `sentinel`,
    /// `RedisConfig::from_sentinels`). Deserialized as `"server"`,
    /// `{"cluster": {"nodes": [...]}}` or `{"sentinel": {"sentinels": [...],
    /// "master": "mymaster"}}`.
    pub deployment: Deployment,
    /// For `rediss://` URLs (feature `tls`): a PEM file of the certificate
    /// authorities to trust instead of the usual roots (a private CA).
    pub tls_root_cert: Option<std::path::PathBuf>,
    /// Whether the scripts run as a Redis function library (`FUNCTION
    /// LOAD` once, then `FCALL`; default true) where the server has
    /// functions (Redis 7, Valkey) and the user may load them. A function
    /// runs its shared helpers' definitions once, at load, instead of on
    /// every call: a lock costs about a fifth less Redis CPU. Without
    /// functions, or with `false`, the same scripts run by `EVALSHA`.
    /// The library (`lockstep_<hash>`, about 40 KB) stays on the server,
    /// in its snapshots and on its replicas, like any function; a server
    /// that lost it is sent it again by the next call.
    pub functions: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            pool_size: 8,
            notifications: true,
            fair: true,
            wait_fallback: Duration::from_secs(1),
            replicas: 0,
            replica_timeout: Duration::from_secs(1),
            deployment: Deployment::Server,
            tls_root_cert: None,
            functions: true,
        }
    }
}

impl RedisConfig {
    /// Defaults with this URL.
    #[must_use]
    pub fn from_url(url: impl Into<String>) -> Self {
        RedisConfig {
            url: Some(url.into()),
            ..RedisConfig::default()
        }
    }

    /// Reads the configuration from the environment (see the type docs).
    ///
    /// # Errors
    ///
    /// [`ConfigError::MissingUrl`] when `LOCKING_REDIS_URL` is unset or
    /// empty, [`ConfigError::InvalidSetting`] for a value that does not parse.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url = get(ENV_URL)
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingUrl { env: ENV_URL })?;
        let mut config = RedisConfig::from_url(url.trim());
        if let Some(ns) = get("LOCKING_REDIS_NAMESPACE") {
            config.namespace = ns;
        }
        let durations: [(&'static str, &mut Duration); 3] = [
            ("LOCKING_REDIS_WAIT_TIMEOUT", &mut config.wait_timeout),
            ("LOCKING_REDIS_CONNECT_TIMEOUT", &mut config.connect_timeout),
            (
                "LOCKING_REDIS_RESPONSE_TIMEOUT",
                &mut config.response_timeout,
            ),
        ];
        for (name, slot) in durations {
            if let Some(v) = get(name) {
                *slot = parse_duration(&v)
                    .map_err(|reason| ConfigError::InvalidSetting { name, reason })?;
            }
        }
        if let Some(v) = get("LOCKING_REDIS_POOL_SIZE") {
            config.pool_size = v.trim().parse().map_err(|_| ConfigError::InvalidSetting {
                name: "LOCKING_REDIS_POOL_SIZE",
                reason: format!("{v:?} is not a whole number"),
            })?;
        }
        Ok(config)
    }

    /// Sets the namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the default wait of `execute`.
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the response timeout.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets the pool size.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Turns release notifications on or off (see the field).
    #[must_use]
    pub fn notifications(mut self, on: bool) -> Self {
        self.notifications = on;
        self
    }

    /// Sets the waiters' fallback period (see the field).
    #[must_use]
    pub fn wait_fallback(mut self, period: Duration) -> Self {
        self.wait_fallback = period;
        self
    }

    /// Requires `replicas` replicas to acknowledge each acquisition within
    /// `timeout` (see the field).
    #[must_use]
    pub fn wait_for_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replicas = replicas;
        self.replica_timeout = timeout;
        self
    }

    /// Trusts the certificate authorities in this PEM file for `rediss://`
    /// (see the field).
    #[must_use]
    pub fn tls_root_cert(mut self, pem_file: impl Into<std::path::PathBuf>) -> Self {
        self.tls_root_cert = Some(pem_file.into());
        self
    }

    /// Serves waiters in arrival order (`true`, the default) or lets them
    /// barge (`false`); see the field.
    #[must_use]
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Runs the scripts as a function library where the server allows it
    /// (`true`, the default) or always by `EVALSHA`; see the field.
    #[must_use]
    pub fn functions(mut self, on: bool) -> Self {
        self.functions = on;
        self
    }

    /// Checks every setting but the URL.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        check_namespace(&self.namespace).map_err(|reason| ConfigError::InvalidSetting {
            name: "namespace",
            reason,
        })?;
        for (name, d, zero_ok) in [
            ("wait_timeout", self.wait_timeout, true),
            ("connect_timeout", self.connect_timeout, false),
            ("response_timeout", self.response_timeout, false),
            ("wait_fallback", self.wait_fallback, false),
            ("replica_timeout", self.replica_timeout, false),
        ] {
            if d.is_zero() && !zero_ok {
                return Err(ConfigError::InvalidSetting {
                    name,
                    reason: "must be greater than zero".into(),
                });
            }
            if d > MAX_DURATION {
                return Err(ConfigError::InvalidSetting {
                    name,
                    reason: format!("{d:?} is above the limit of {MAX_DURATION:?}"),
                });
            }
        }
        self.deployment.check()?;
        if self.pool_size == 0 {
            return Err(ConfigError::InvalidSetting {
                name: "pool_size",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written by hand so that the password never reaches a log.
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("namespace", &self.namespace)
            .field("wait_timeout", &self.wait_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("pool_size", &self.pool_size)
            .field("notifications", &self.notifications)
            .field("fair", &self.fair)
            .field("wait_fallback", &self.wait_fallback)
            .field("replicas", &self.replicas)
            .field("replica_timeout", &self.replica_timeout)
            .field("deployment", &self.deployment)
            .field("tls_root_cert", &self.tls_root_cert)
            .field("functions", &self.functions)
            .finish()
    }
}

/// Parses `250ms`, `5s`, `1.5s`, `2m` or `1h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. 250ms, 5s, 1m or 1h"))?;
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m or h"
            ));
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("{text:?} is above the limit of {MAX_DURATION:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(feature = "serde")]
pub(crate) mod de {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};

    /// A duration as a string with a unit, or an integer of milliseconds.
    pub(crate) fn duration<'de, D: de::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"5s\" or \"250ms\", or milliseconds as an integer")
            }
            fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Duration, E> {
                Ok(Duration::from_millis(ms))
            }
            fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Duration, E> {
                u64::try_from(ms)
                    .map(Duration::from_millis)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                super::parse_duration(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("99999999h").is_err());
    }

    #[test]
    fn passwords_stay_out_of_debug() {
        let c = RedisConfig::from_url("redis://:hunter2@h");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn env_lookup() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(matches!(
            RedisConfig::from_lookup(env(&[])),
            Err(ConfigError::MissingUrl { .. })
        ));
        let c = RedisConfig::from_lookup(env(&[
            (ENV_URL, "redis://h:1"),
            ("LOCKING_REDIS_NAMESPACE", "shop:"),
            ("LOCKING_REDIS_WAIT_TIMEOUT", "2s"),
            ("LOCKING_REDIS_POOL_SIZE", "3"),
        ]))
        .unwrap();
        assert_eq!(c.url.as_deref(), Some("redis://h:1"));
        assert_eq!(c.namespace, "shop:");
        assert_eq!(c.wait_timeout, Duration::from_secs(2));
        assert_eq!(c.pool_size, 3);
        let bad = RedisConfig::from_lookup(env(&[
            (ENV_URL, "redis://h:1"),
            ("LOCKING_REDIS_CONNECT_TIMEOUT", "2"),
        ]));
        assert!(matches!(
            bad,
            Err(ConfigError::InvalidSetting {
                name: "LOCKING_REDIS_CONNECT_TIMEOUT",
                ..
            })
        ));
    }

    #[test]
    fn settings_are_checked() {
        assert!(RedisConfig::default().check().is_ok());
        assert!(RedisConfig::default().namespace("").check().is_err());
        assert!(
            RedisConfig::default()
                .connect_timeout(Duration::ZERO)
                .check()
                .is_err()
        );
        assert!(RedisConfig::default().pool_size(0).check().is_err());
        assert!(
            RedisConfig::default()
                .wait_timeout(Duration::ZERO)
                .check()
                .is_ok()
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn deserializes_with_defaults() {
        let c: RedisConfig = serde_json::from_str(
            r#"{"url":"redis://h","namespace":"shop:","wait_timeout":"2s","response_timeout":750}"#,
        )
        .unwrap();
        assert_eq!(c.namespace, "shop:");
        assert_eq!(c.wait_timeout, Duration::from_secs(2));
        assert_eq!(c.response_timeout, Duration::from_millis(750));
        assert_eq!(c.connect_timeout, RedisConfig::default().connect_timeout);
        assert!(serde_json::from_str::<RedisConfig>(r#"{"url":"x","bogus":1}"#).is_err());
        assert!(serde_json::from_str::<RedisConfig>(r#"{"wait_timeout":"5"}"#).is_err());
    }
}
