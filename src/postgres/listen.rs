//! The LISTEN connection and the local waiter registry it wakes.
//!
//! One dedicated connection per provider (not pooled) runs `LISTEN` on the
//! schema's channel; a task drives it with `poll_message` and wakes the
//! registry's `Notify` of each notified key. When the connection drops it is
//! made again after a pause, and every waiter is woken on reconnect (it may
//! have missed notifications); in between, waiters fall back to retrying
//! once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use super::Inner;

/// The pause before making a dropped LISTEN connection again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Listener {
    up: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts the LISTEN task, waiting (at most the connect timeout) for its
    /// first `LISTEN` to be in place; if it is not, it keeps trying in the
    /// background.
    pub(crate) async fn start(pg: tokio_postgres::Config, inner: Arc<Inner>) -> Listener {
        let up = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = oneshot::channel();
        let within = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let task = tokio::spawn(run(pg, inner, Arc::clone(&up), ready_tx));
        let _ = tokio::time::timeout(within, ready_rx).await;
        Listener { up, task }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    pg: tokio_postgres::Config,
    inner: Arc<Inner>,
    up: Arc<AtomicBool>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    // Stopped by `shutdown` (the token), or aborted when the last clone of
    // the provider drops its `Listener`.
    while !inner.shutdown.is_cancelled() {
        match listen_once(&pg, &inner, &up, &mut ready).await {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "lockstep postgres: LISTEN connection lost"),
        }
        up.store(false, Ordering::Release);
        // Waiters may have missed a notification: they retry now.
        inner.wake_all();
        tokio::select! {
            () = inner.shutdown.cancelled() => break,
            () = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}

async fn listen_once(
    pg: &tokio_postgres::Config,
    inner: &Inner,
    up: &AtomicBool,
    ready: &mut Option<oneshot::Sender<()>>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    let sql = format!("LISTEN \"{}\"", inner.names.channel);
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return Ok(()),
            r = &mut listen, if !listening => {
                r?;
                listening = true;
                up.store(true, Ordering::Release);
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
                // Anything released while we were not listening.
                inner.wake_all();
            }
            m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                Some(Ok(AsyncMessage::Notification(n))) => inner.wake(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}

/// One waiting call's interest in its keys: the registry's `Notify` of each,
/// in request order. Its entries go when their last waiter leaves, however
/// the wait ends (a return or a dropped future).
pub(crate) struct Registration<'a> {
    inner: &'a Inner,
    keys: &'a [String],
    pub(crate) notifies: Vec<Arc<Notify>>,
}

impl Inner {
    pub(crate) fn register<'a>(&'a self, keys: &'a [String]) -> Registration<'a> {
        let mut waiters = self.waiters();
        let notifies = keys
            .iter()
            .map(|k| Arc::clone(waiters.entry(k.clone()).or_default()))
            .collect();
        Registration {
            inner: self,
            keys,
            notifies,
        }
    }

    /// Wakes the waiters of `key`, if any.
    pub(crate) fn wake(&self, key: &str) {
        if let Some(n) = self.waiters().get(key) {
            n.notify_waiters();
        }
    }

    /// Wakes every waiter.
    pub(crate) fn wake_all(&self) {
        for n in self.waiters().values() {
            n.notify_waiters();
        }
    }

    /// How many of this provider's calls wait for `key`.
    pub(crate) fn local_waiters(&self, key: &str) -> u64 {
        // Each waiting call holds a clone; the map one more.
        self.waiters()
            .get(key)
            .map_or(0, |n| Arc::strong_count(n).saturating_sub(1) as u64)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiters = self.inner.waiters();
        self.notifies.clear();
        for key in self.keys {
            if let Some(n) = waiters.get(key)
                && Arc::strong_count(n) == 1
            {
                waiters.remove(key);
            }
        }
    }
}
