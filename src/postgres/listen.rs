//! The LISTEN connection.
//!
//! One dedicated connection per provider (not pooled) runs `LISTEN` on the
//! provider's own channel, `lockstep.<pid>`; a task drives it with
//! `poll_message` and hands each message to the local queues (`queue.rs`):
//! `r<key>` (the lock was reserved for this provider) or `w<key>` (retry).
//! When the connection drops it is made again after a pause, and every
//! waiter is woken on reconnect (it may have missed messages); in between,
//! waiters do not queue in the server and retry once a second.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use super::Inner;

/// How often the LISTEN task sweeps expired rows (`Inner::sweep`).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The pause before making a dropped LISTEN connection again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Listener {
    task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl Listener {
    /// Starts the LISTEN task, waiting (at most the connect timeout) for its
    /// first `LISTEN` to be in place; if it is not, it keeps trying in the
    /// background.
    pub(crate) async fn start(pg: tokio_postgres::Config, inner: Arc<Inner>) -> Listener {
        let (ready_tx, ready_rx) = oneshot::channel();
        let within = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        // Owned before the wait below: dropped there (the caller's connect
        // was), it aborts both tasks, which would otherwise hold the pool
        // and the LISTEN connection for the life of the process.
        let listener = Listener {
            sweeper: tokio::spawn(sweep_now_and_then(Arc::clone(&inner))),
            task: tokio::spawn(run(pg, inner, ready_tx)),
        };
        let _ = tokio::time::timeout(within, ready_rx).await;
        listener
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        self.sweeper.abort();
    }
}

async fn run(pg: tokio_postgres::Config, inner: Arc<Inner>, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    // Stopped by `shutdown` (the token), or aborted when the last clone of
    // the provider drops its `Listener`.
    while !inner.shutdown.is_cancelled() {
        match listen_once(&pg, &inner, &mut ready).await {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "lockstep postgres: LISTEN connection lost"),
        }
        inner.listening.store(false, Ordering::Release);
        // Waiters may have missed a notification: they retry now.
        inner.wake_all();
        tokio::select! {
            () = inner.shutdown.cancelled() => break,
            () = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}

/// Sweeps expired rows every SWEEP_EVERY (the first after a random part
/// of it, so that providers started together do not sweep together).
async fn sweep_now_and_then(inner: Arc<Inner>) {
    let first = SWEEP_EVERY.mul_f64(f64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 255.0);
    let mut pause = first;
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        match inner.sweep().await {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "lockstep postgres: swept expired rows"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "lockstep postgres: sweep failed"),
        }
        pause = SWEEP_EVERY;
    }
}

async fn listen_once(
    pg: &tokio_postgres::Config,
    inner: &Arc<Inner>,
    ready: &mut Option<oneshot::Sender<()>>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    let sql = format!("LISTEN \"{}\"", inner.channel());
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return Ok(()),
            r = &mut listen, if !listening => {
                r?;
                listening = true;
                inner.listening.store(true, Ordering::Release);
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
                // Anything released while we were not listening.
                inner.wake_all();
            }
            m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let payload = n.payload();
                    if let Some(key) = payload.strip_prefix('r') {
                        inner.wake(key, true);
                    } else if let Some(key) = payload.strip_prefix('w') {
                        inner.wake(key, false);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}
