//! Classifying Redis failures: what a caller may conclude from each.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::error::{BackendError, BackendErrorKind, LockError};

/// A request sent that got no reply within `limit`: it may have run.
pub(crate) fn no_reply(operation: &'static str, limit: Duration) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::OutcomeUnknown,
        operation,
        format!("no reply within {limit:?}"),
        None,
    ))
}

/// A failure before it is classified.
#[derive(Debug)]
pub(crate) enum RawError {
    Redis(RedisError),
    Connect(String, Option<RedisError>),
    Closed,
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Redis(e) => write!(f, "{e}"),
            RawError::Connect(reason, _) => f.write_str(reason),
            RawError::Closed => f.write_str("the provider has been shut down"),
        }
    }
}

impl RawError {
    /// Classifies the failure. `sent` says whether the request may have
    /// reached the server, which turns connection failures into "outcome
    /// unknown".
    pub(crate) fn into_lock_error(self, operation: &'static str, sent: bool) -> LockError {
        let (kind, message, source) = match self {
            RawError::Closed => {
                return LockError::Shutdown {
                    provider: "locking-redis".into(),
                };
            }
            RawError::Connect(reason, source) => (
                BackendErrorKind::Unavailable,
                reason,
                source.map(|e| Box::new(e) as _),
            ),
            RawError::Redis(e) => {
                let kind = if is_auth_error(&e) {
                    BackendErrorKind::Auth
                } else if e.is_connection_refusal()
                    || !sent && e.is_io_error()
                    || refused_for_now(&e)
                    // A cluster node the client has no connection to (it
                    // reconnects from the seed nodes).
                    || e.kind() == ErrorKind::ClusterConnectionNotFound
                {
                    BackendErrorKind::Unavailable
                } else if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    BackendErrorKind::OutcomeUnknown
                } else {
                    BackendErrorKind::Server
                };
                (kind, e.to_string(), Some(Box::new(e) as _))
            }
        };
        LockError::Backend(BackendError::new(kind, operation, message, source))
    }
}

/// A server that refused the request without running it, for a reason that
/// passes: loading its data after a restart, a failover in progress, a
/// cluster slot moving (a redirection the client could not follow within
/// its retries).
fn refused_for_now(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        )
    )
}

/// Whether the connection must be replaced after this error.
pub(crate) fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Wrong credentials, missing AUTH, or a missing ACL permission.
pub(crate) fn is_auth_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        // Errors inside a script (a missing key permission) carry the code
        // only in their text.
        || ["NOAUTH", "WRONGPASS", "NOPERM"]
            .iter()
            .any(|code| e.to_string().contains(code))
}

/// A reply that does not have the shape the script's contract promises.
pub(crate) fn unexpected(operation: &'static str, e: impl std::fmt::Display) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::Server,
        operation,
        format!("unexpected reply: {e}"),
        None,
    ))
}

/// An acquisition that too few replicas acknowledged (and that was, or is
/// being, released).
pub(crate) fn not_replicated(acked: i64, required: usize, wait: Duration) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::NotReplicated,
        "acquire",
        format!(
            "{acked} of {required} replicas acknowledged within {wait:?}; the locks were released"
        ),
        None,
    ))
}
