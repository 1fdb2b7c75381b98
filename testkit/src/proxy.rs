//! A TCP proxy for fault injection: delay, partition, drop replies, cut.

use std::time::Duration;

/// A TCP proxy in front of a server, for fault injection: it can delay
/// traffic, drop it (a partition), or cut every connection. It runs on a
/// thread and runtime of its own, so it keeps working whatever the test's
/// runtime does.
#[derive(Debug)]
pub struct Proxy {
    /// The proxy's loopback port.
    pub port: u16,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Delay added to each chunk, each way.
    latency: Duration,
    /// Drop what the client sends (requests never arrive).
    drop_requests: bool,
    /// Drop what the server sends (replies never arrive).
    drop_replies: bool,
    /// Bumped by `cut()`: connections of an older generation close.
    generation: u64,
}

impl Proxy {
    /// A proxy to `127.0.0.1:target_port` on a free loopback port.
    pub fn start(target_port: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let shared = std::sync::Arc::clone(&state);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((client, _)) = listener.accept().await {
                    let state = std::sync::Arc::clone(&shared);
                    tokio::spawn(async move {
                        let Ok(server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                        else {
                            return;
                        };
                        let generation = state.lock().unwrap().generation;
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let up = pump(cr, sw, std::sync::Arc::clone(&state), generation, true);
                        let down = pump(sr, cw, state, generation, false);
                        tokio::select! { _ = up => {}, _ = down => {} }
                    });
                }
            });
        });
        Proxy { port, state }
    }

    /// `redis://127.0.0.1:<proxy port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Adds `d` of delay to every chunk, each way.
    pub fn set_latency(&self, d: Duration) {
        self.state.lock().unwrap().latency = d;
    }

    /// Drops requests and replies (a partition), or lets them through again.
    pub fn partition(&self, on: bool) {
        let mut s = self.state.lock().unwrap();
        s.drop_requests = on;
        s.drop_replies = on;
    }

    /// Drops only replies: requests still reach the server and run.
    pub fn drop_replies(&self, on: bool) {
        self.state.lock().unwrap().drop_replies = on;
    }

    /// Closes every connection open now.
    pub fn cut(&self) {
        self.state.lock().unwrap().generation += 1;
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    generation: u64,
    upstream: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await;
        let (latency, dropped, current) = {
            let s = state.lock().unwrap();
            let dropped = if upstream {
                s.drop_requests
            } else {
                s.drop_replies
            };
            (s.latency, dropped, s.generation)
        };
        if current != generation {
            return; // cut
        }
        let n = match read {
            Err(_) => continue, // no data yet: look at the controls again
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if dropped {
            continue;
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
