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
    /// Connections accepted so far (each connection's number).
    accepted: u64,
    /// Connections numbered below this hold what their client sends
    /// (`stall_open_connections`), even after the client hung up.
    stall_below: u64,
    /// Bytes held by stalled connections right now.
    stalled_bytes: usize,
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
                        let (generation, number) = {
                            let mut s = state.lock().unwrap();
                            s.accepted += 1;
                            (s.generation, s.accepted - 1)
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let up = pump(
                            cr,
                            sw,
                            std::sync::Arc::clone(&state),
                            generation,
                            Some(number),
                        );
                        let down = pump(sr, cw, state, generation, None);
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

    /// The connections open now hold what their clients send, as a network
    /// that delays packets would, and deliver it at [`unstall`](Self::unstall),
    /// even if the client has hung up meanwhile. Later connections pass.
    pub fn stall_open_connections(&self) {
        let mut s = self.state.lock().unwrap();
        s.stall_below = s.accepted;
    }

    /// Lets the held bytes through.
    pub fn unstall(&self) {
        self.state.lock().unwrap().stall_below = 0;
    }

    /// How many bytes stalled connections hold now (0 once delivered, or
    /// refused by a server that closed the connection).
    pub fn stalled_bytes(&self) -> usize {
        self.state.lock().unwrap().stalled_bytes
    }
}

/// Copies `from` to `to` until either closes or the proxy cuts the
/// connection. `upstream`: the client's side, with its connection number
/// (stalled connections hold its bytes).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    generation: u64,
    upstream: Option<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut held = Held {
        bytes: Vec::new(),
        state: std::sync::Arc::clone(&state),
    };
    let mut client_gone = false;
    loop {
        let read = if client_gone {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(())
        } else {
            tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf))
                .await
                .map_err(|_| ())
        };
        let (latency, dropped, current, stalled) = {
            let s = state.lock().unwrap();
            let dropped = if upstream.is_some() {
                s.drop_requests
            } else {
                s.drop_replies
            };
            let stalled = upstream.is_some_and(|n| n < s.stall_below);
            (s.latency, dropped, s.generation, stalled)
        };
        if current != generation {
            return; // cut
        }
        if !stalled && !held.bytes.is_empty() {
            let delivered = to.write_all(&held.bytes).await.is_ok();
            held.clear();
            if !delivered {
                return;
            }
        }
        let n = match read {
            Err(()) if client_gone && held.bytes.is_empty() => return,
            Err(()) => continue, // no data yet: look at the controls again
            Ok(Ok(0)) | Ok(Err(_)) if held.bytes.is_empty() => return,
            // The client hung up; what it sent is still on its way.
            Ok(Ok(0)) | Ok(Err(_)) => {
                client_gone = true;
                continue;
            }
            Ok(Ok(n)) => n,
        };
        if dropped {
            continue;
        }
        if stalled {
            held.bytes.extend_from_slice(&buf[..n]);
            state.lock().unwrap().stalled_bytes += n;
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

/// Bytes a stalled connection holds; counted in `stalled_bytes` until they
/// are delivered or the connection ends.
struct Held {
    bytes: Vec<u8>,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

impl Held {
    fn clear(&mut self) {
        self.state.lock().unwrap().stalled_bytes -= self.bytes.len();
        self.bytes.clear();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.clear();
    }
}
