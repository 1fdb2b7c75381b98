//! Riding out transient backend failures (a Redis restart, a failover)
//! for operations that are safe to repeat: owner-checked releases.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::error::LockError;

/// How long a release is retried through transient failures before its
/// error is reported: a lock left held would make every other caller wait
/// for its lease to end.
pub(crate) const RELEASE_RETRY_FOR: Duration = Duration::from_secs(10);

/// The pause between two tries.
const PAUSE: Duration = Duration::from_millis(50);

/// Runs `op` until it succeeds, fails with an error that is not transient
/// ([`LockError::is_transient`]), or [`RELEASE_RETRY_FOR`] has passed.
pub(crate) async fn ride_out<T, F, Fut>(mut op: F) -> Result<T, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LockError>>,
{
    let give_up_at = Instant::now() + RELEASE_RETRY_FOR;
    loop {
        match op().await {
            Err(e) if e.is_transient() && Instant::now() < give_up_at => sleep(PAUSE).await,
            result => return result,
        }
    }
}
