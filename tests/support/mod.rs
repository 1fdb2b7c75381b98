//! Test support: a real redis-server for the tests, and helpers.
//!
//! Where Redis comes from, in order:
//! 1. `REDIS_URL`, when set: a server you run. Tests only touch keys under
//!    their own random namespaces and never flush it.
//! 2. A `redis-server` binary (`LOCKSTEP_REDIS_SERVER_BIN`, else `PATH`):
//!    spawned on a free loopback port, one per test binary, plus private
//!    servers for tests that restart, flush or reconfigure theirs.
//! 3. Docker, with the `testcontainers` feature.
//!
//! Otherwise the tests fail with instructions. The machine's own Redis on
//! 6379 is never used unless `REDIS_URL` points at it.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod cluster;
pub mod sentinel;

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lockstep::{LockingModule, RedisConfig, RedisProvider};

/// A redis-server child process, stopped when dropped.
///
/// It runs under a small `sh` guard that kills it with SIGKILL as soon as
/// our end of the guard's stdin closes, which happens when this value is
/// dropped *or* when the test process exits in any way. A server started
/// for a whole test binary therefore never outlives it.
pub struct RedisServer {
    guard: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The redis-server process id, for fault injection (kill, stop).
    pub pid: u32,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    /// A config file given before the arguments (a sentinel needs one).
    conf: Option<String>,
}

/// How long a server may take to accept connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

static SERVER_SEQ: AtomicU32 = AtomicU32::new(0);

impl RedisServer {
    /// Starts a server on a free loopback port with extra `args`.
    pub fn start(args: &[&str]) -> RedisServer {
        Self::start_with(None, None, args)
    }

    /// Starts a server on `port` (a free one if `None`), with a config file
    /// holding `conf` if given (written to the server's directory: a
    /// sentinel rewrites its own), and extra `args`.
    pub fn start_with(port: Option<u16>, conf: Option<&str>, args: &[&str]) -> RedisServer {
        let (bin, dir) = Self::prepare();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // A port picked by binding port 0 can be taken by someone else
        // before redis binds it: try a few.
        let conf = conf.map(str::to_owned);
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = port.unwrap_or_else(free_port);
            match Self::spawn(&bin, &dir, port, &args, conf.as_deref()) {
                Ok(server) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("redis-server did not start; its log:\n{last_log}");
    }

    /// One attempt to start a server on `port` (with a config file holding
    /// `conf` if given): its log if it did not start. For servers whose port
    /// is written into other servers' configs, so that a taken port means
    /// starting the whole group again.
    pub fn try_start_at(
        port: u16,
        conf: Option<&str>,
        args: &[&str],
    ) -> Result<RedisServer, String> {
        let (bin, dir) = Self::prepare();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn(&bin, &dir, port, &args, conf)
    }

    /// The redis-server binary, and a fresh directory for one server.
    fn prepare() -> (PathBuf, PathBuf) {
        let bin = server_bin().unwrap_or_else(|| panic!("{}", missing_redis_help()));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "redis-{}-{}",
            std::process::id(),
            SERVER_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        (bin, dir)
    }

    fn spawn(
        bin: &Path,
        dir: &Path,
        port: u16,
        args: &[String],
        conf: Option<&str>,
    ) -> Result<RedisServer, String> {
        let log = dir.join("redis.log");
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new("sh");
        command
            .arg("-c")
            // Start redis, print its pid, then wait for our stdin to close
            // (EOF) and kill it.
            .arg(r#"bin="$1"; shift; "$bin" "$@" & pid=$!; echo "$pid"; read _unused; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null"#)
            .arg("sh")
            .arg(bin);
        if let Some(conf) = conf {
            let file = dir.join("server.conf");
            std::fs::write(&file, conf).map_err(|e| e.to_string())?;
            command.arg(file);
        }
        command
            .args(["--port", &port.to_string()])
            // Loopback only.
            .args(["--bind", "127.0.0.1"])
            // No dump.rdb, no AOF: tests leave nothing on disk.
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut guard = command.spawn().map_err(|e| format!("cannot run sh: {e}"))?;
        let stdin = guard.stdin.take();
        let mut stdout = BufReader::new(guard.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let pid: u32 = line
            .trim()
            .parse()
            .map_err(|_| format!("no pid from the guard: {line:?}"))?;
        let mut server = RedisServer {
            guard: Some(guard),
            stdin,
            pid,
            port,
            dir: dir.to_owned(),
            args: args.to_vec(),
            conf: conf.map(str::to_owned),
        };
        let deadline = Instant::now() + STARTUP_DEADLINE;
        while Instant::now() < deadline {
            if ping(port) {
                return Ok(server);
            }
            if !server.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = server.log();
        server.stop();
        Err(log)
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Whether the redis-server process still exists.
    pub fn is_running(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .unwrap_or_default()
                .contains(") Z ")
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.wait();
        }
    }

    /// Sends a signal to the redis-server process (e.g. "STOP", "CONT", "KILL").
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Kills the server with SIGKILL and starts a fresh one on the same
    /// port with the same arguments (an empty dataset: nothing is saved).
    pub fn restart(&mut self) {
        self.stop();
        let bin = server_bin().expect("redis-server was found before");
        let mut last_log = String::new();
        for _ in 0..20 {
            match Self::spawn(&bin, &self.dir, self.port, &self.args, self.conf.as_deref()) {
                Ok(fresh) => {
                    *self = fresh;
                    return;
                }
                // The port can linger for a moment after the kill.
                Err(log) => last_log = log,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis-server did not restart on port {}; its log:\n{last_log}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port (never 0: `--port 0` turns TCP off in redis-server).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

fn ping(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    // +PONG, or -NOAUTH from a server that wants a password: both are up.
    n > 0 && (buf.starts_with(b"+PONG") || buf.starts_with(b"-NOAUTH"))
}

/// The redis-server binary, if there is one.
pub fn server_bin() -> Option<PathBuf> {
    if let Ok(bin) = std::env::var("LOCKSTEP_REDIS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "LOCKSTEP_REDIS_SERVER_BIN={} is not a file",
            bin.display()
        );
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

pub fn missing_redis_help() -> String {
    "These tests need a real Redis, and none was found.\n\
     Do one of:\n\
     - install redis-server: `sudo apt-get install -y redis-server` (Debian/Ubuntu), \
       `brew install redis` (macOS); or run `scripts/test`, which installs it where it can;\n\
     - point LOCKSTEP_REDIS_SERVER_BIN at a redis-server binary;\n\
     - set REDIS_URL to a Redis you run (tests use random key namespaces and never flush it);\n\
     - with Docker running, add `--features testcontainers`."
        .to_owned()
}

/// Where the shared Redis of this test binary is.
enum Shared {
    Url(String),
    Spawned(RedisServer),
    #[cfg(feature = "testcontainers")]
    Container(String, Box<dyn std::any::Any + Send + Sync>),
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The URL of the Redis shared by this test binary.
pub fn shared_url() -> String {
    let shared = SHARED.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL")
            && !url.is_empty()
        {
            return Shared::Url(url);
        }
        if server_bin().is_some() {
            return Shared::Spawned(RedisServer::start(&[]));
        }
        #[cfg(feature = "testcontainers")]
        if let Some((url, container)) = container::start() {
            return Shared::Container(url, container);
        }
        panic!("{}", missing_redis_help());
    });
    match shared {
        Shared::Url(url) => url.clone(),
        Shared::Spawned(server) => server.url(),
        #[cfg(feature = "testcontainers")]
        Shared::Container(url, _) => url.clone(),
    }
}

#[cfg(feature = "testcontainers")]
mod container {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    /// Redis 7 in Docker, if a Docker engine answers.
    pub(super) fn start() -> Option<(String, Box<dyn std::any::Any + Send + Sync>)> {
        let container = GenericImage::new("redis", "7")
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_cmd(["redis-server", "--save", "", "--appendonly", "no"])
            .start()
            .ok()?;
        let host = container.get_host().ok()?;
        let port = container.get_host_port_ipv4(6379).ok()?;
        Some((format!("redis://{host}:{port}"), Box::new(container)))
    }
}

/// A namespace no other test uses, so tests can share one server.
pub fn unique_namespace() -> String {
    format!("t{}:", &uuid_like()[..12])
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

/// A Redis provider on the shared server, in a fresh namespace.
pub async fn redis_provider() -> RedisProvider {
    redis_provider_in(&unique_namespace()).await
}

/// A Redis provider on the shared server, in `namespace`.
pub async fn redis_provider_in(namespace: &str) -> RedisProvider {
    let config = RedisConfig::from_url(shared_url()).namespace(namespace);
    RedisProvider::connect(config)
        .await
        .expect("connect to the test Redis")
}

/// A module whose default provider is Redis (registered as "locking-redis").
pub fn module_with(provider: RedisProvider) -> LockingModule {
    LockingModule::builder()
        .default_provider("locking-redis", provider)
        .build()
        .expect("valid module")
}

/// A plain redis-rs connection to `url`, for looking at keys directly.
pub async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Waits until `check` is true, polling every few milliseconds, or panics
/// with `what` after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A TCP proxy in front of a server, for fault injection: it can delay
/// traffic, drop it (a partition), or cut every connection. It runs on a
/// thread and runtime of its own, so it keeps working whatever the test's
/// runtime does.
pub struct Proxy {
    pub port: u16,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

#[derive(Default)]
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

/// Waits until the replica at `url` is in sync with its master.
pub async fn wait_until_in_sync(url: &str) {
    let c = raw_connection(url).await;
    eventually(Duration::from_secs(10), "the replica is in sync", || {
        let mut c = c.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap();
            info.contains("master_link_status:up")
        }
    })
    .await;
}
