//! The process's subscription to its notification channel: connected,
//! pinged, reconnected, and every message handed to the registry.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::{sleep, timeout};

use super::Waiting;
use super::waiter::Withdrawal;

/// How often the subscription connection is pinged, to notice a silent
/// (half-open) connection.
const PING_EVERY: Duration = Duration::from_secs(2);

/// Keeps the process subscribed to its channel and dispatches messages,
/// reconnecting after a failure or when `moved` fires (to `client()`, the
/// current master), until `waiting.stop` fires or `client()` is `None`. `withdraw` is
/// called with a lock reserved for this process that nobody here wants.
pub(crate) async fn subscribe(
    client: impl Fn() -> Option<redis::Client> + Send + 'static,
    moved: Arc<Notify>,
    waiting: Arc<Waiting>,
    connect_timeout: Duration,
    ready: tokio::sync::oneshot::Sender<Result<(), redis::RedisError>>,
    withdraw: impl Fn(String, Arc<Withdrawal>) + Send + 'static,
) {
    let mut ready = Some(ready);
    let mut pause = Duration::from_millis(20);
    let channel = waiting.channel();
    loop {
        // None: the provider is gone.
        let Some(client) = client() else {
            return;
        };
        let connected = tokio::select! {
            r = connect(&client, &channel, connect_timeout) => r,
            _ = waiting.stop.cancelled() => return,
        };
        let (sink, stream) = match connected {
            Ok(halves) => halves,
            Err(error) => {
                tracing::debug!("lock notification subscription failed: {error}");
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(error));
                    return;
                }
                tokio::select! {
                    _ = sleep(pause) => {}
                    _ = waiting.stop.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        pause = Duration::from_millis(20);
        waiting.set_subscribed(true);
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
        // Messages sent while we were away are lost: everyone tries again.
        waiting.wake_all();
        let stopped = listen(sink, stream, &moved, &waiting, connect_timeout, &withdraw).await;
        waiting.set_subscribed(false);
        if stopped {
            return;
        }
        tracing::debug!("lock notification subscription lost; reconnecting");
        waiting.wake_all();
    }
}

/// A subscription to `channel` on `client`, within `limit`.
async fn connect(
    client: &redis::Client,
    channel: &str,
    limit: Duration,
) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), redis::RedisError> {
    let attempt = async {
        let pubsub = client.get_async_pubsub().await?;
        let (mut sink, stream) = pubsub.split();
        sink.subscribe(channel).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    };
    timeout(limit, attempt).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "subscription timed out",
        )))
    })
}

/// Dispatches the messages of one subscription until it is lost (its
/// stream ends, a `PING` goes unanswered, or the master `moved`): returns
/// false then, true when `waiting.stop` fired.
async fn listen(
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
    moved: &Notify,
    waiting: &Waiting,
    ping_limit: Duration,
    withdraw: &impl Fn(String, Arc<Withdrawal>),
) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(m) => {
                    if let Ok(text) = std::str::from_utf8(m.get_payload_bytes())
                        && let Some((key, ticket)) = waiting.dispatch(text) {
                            withdraw(key, ticket);
                        }
                }
                None => return false,
            },
            _ = ping.tick() => {
                // A subscribed connection answers PING with an array ("pong",
                // ""), not a status: accept any reply.
                if !matches!(timeout(ping_limit, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
                    return false;
                }
            }
            _ = waiting.stop.cancelled() => return true,
            // The master moved: subscribe on the new one.
            _ = moved.notified() => return false,
        }
    }
}
