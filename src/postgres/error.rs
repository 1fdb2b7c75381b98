//! tokio-postgres and pool failures as [`BackendError`]s.

use deadpool_postgres::PoolError;

use crate::error::{BackendError, BackendErrorKind, LockError};

/// A failure before the statement was sent (no connection from the pool,
/// or preparing it failed): it had no effect.
pub(crate) fn unavailable(operation: &'static str, e: PoolError) -> LockError {
    let kind = match &e {
        PoolError::Backend(pg) if is_auth(pg) => BackendErrorKind::Auth,
        _ => BackendErrorKind::Unavailable,
    };
    LockError::Backend(BackendError::new(
        kind,
        operation,
        match &e {
            PoolError::Backend(pg) => describe(pg),
            other => other.to_string(),
        },
        Some(Box::new(e)),
    ))
}

/// A statement that failed. An error the server answered with is an
/// answer: the statement's transaction was rolled back, so it had no effect
/// (a statement timeout or a deadlock pass: `Unavailable`, transient). A
/// connection that broke while the statement may have been sent leaves its
/// outcome unknown.
pub(crate) fn statement(operation: &'static str, e: tokio_postgres::Error) -> LockError {
    let kind = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            if is_auth(&e) {
                BackendErrorKind::Auth
            } else if matches!(code, "57014" | "40P01" | "40001" | "55P03")
                || code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
            {
                // query_canceled (statement_timeout), deadlock, serialization,
                // lock_not_available, connection, shutdown, resources.
                BackendErrorKind::Unavailable
            } else {
                BackendErrorKind::Server
            }
        }
        None => BackendErrorKind::OutcomeUnknown,
    };
    LockError::Backend(BackendError::new(
        kind,
        operation,
        describe(&e),
        Some(Box::new(e)),
    ))
}

/// A preparation that failed: nothing of the operation ran.
pub(crate) fn prepare(operation: &'static str, e: tokio_postgres::Error) -> LockError {
    let kind = if is_auth(&e) {
        BackendErrorKind::Auth
    } else if e.as_db_error().is_some() {
        BackendErrorKind::Server
    } else {
        BackendErrorKind::Unavailable
    };
    LockError::Backend(BackendError::new(
        kind,
        operation,
        describe(&e),
        Some(Box::new(e)),
    ))
}

/// No reply within the statement timeout.
pub(crate) fn timed_out(operation: &'static str, after: std::time::Duration) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::OutcomeUnknown,
        operation,
        format!("no reply within {after:?}"),
        None,
    ))
}

/// A reply lockstep did not expect.
pub(crate) fn unexpected(operation: &'static str, what: impl Into<String>) -> LockError {
    LockError::Backend(BackendError::new(
        BackendErrorKind::Server,
        operation,
        what,
        None,
    ))
}

fn is_auth(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("28") || code == "42501"
    })
}

/// The server's message for a server error ("db error" alone says
/// nothing), else the client's.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}
