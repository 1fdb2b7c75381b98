//! One redis-server launcher: a private server on a free loopback port,
//! and the Redis shared by one test binary.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A redis-server child process, stopped when dropped.
///
/// It runs under a small `sh` guard that kills it with SIGKILL as soon as
/// our end of the guard's stdin closes, which happens when this value is
/// dropped *or* when the test process exits in any way. A server started
/// for a whole test binary therefore never outlives it.
#[derive(Debug)]
pub struct RedisServer {
    guard: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The redis-server process id, for fault injection (kill, stop).
    pub pid: u32,
    /// Its loopback port.
    pub port: u16,
    /// Its working directory (log, persistence files), removed when dropped.
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
    ///
    /// # Panics
    ///
    /// As [`start_with`](Self::start_with).
    pub fn start(args: &[&str]) -> RedisServer {
        Self::start_with(None, None, args)
    }

    /// Starts a server on `port` (a free one if `None`), with a config file
    /// holding `conf` if given (written to the server's directory: a
    /// sentinel rewrites its own), and extra `args`.
    ///
    /// # Panics
    ///
    /// When no redis-server is found or it does not start (with its log).
    pub fn start_with(port: Option<u16>, conf: Option<&str>, args: &[&str]) -> RedisServer {
        Self::try_start_with(port, conf, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start_with`](Self::start_with), returning why instead of panicking
    /// (for the command line's `--spawn-redis`).
    ///
    /// # Errors
    ///
    /// No redis-server binary, or the server's log when it did not start.
    pub fn try_start_with(
        port: Option<u16>,
        conf: Option<&str>,
        args: &[&str],
    ) -> Result<RedisServer, String> {
        let (bin, dir) = Self::prepare()?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // A port picked by binding port 0 can be taken by someone else
        // before redis binds it: try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = port.unwrap_or_else(free_port);
            match Self::spawn(&bin, &dir, port, &args, conf) {
                Ok(server) => return Ok(server),
                Err(log) => last_log = log,
            }
        }
        Err(format!("redis-server did not start; its log:\n{last_log}"))
    }

    /// One attempt to start a server on `port` (with a config file holding
    /// `conf` if given): its log if it did not start. For servers whose port
    /// is written into other servers' configs, so that a taken port means
    /// starting the whole group again.
    ///
    /// # Errors
    ///
    /// As [`try_start_with`](Self::try_start_with).
    pub fn try_start_at(
        port: u16,
        conf: Option<&str>,
        args: &[&str],
    ) -> Result<RedisServer, String> {
        let (bin, dir) = Self::prepare()?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn(&bin, &dir, port, &args, conf)
    }

    /// The redis-server binary, and a fresh directory for one server.
    fn prepare() -> Result<(PathBuf, PathBuf), String> {
        let bin = server_bin().ok_or_else(missing_redis_help)?;
        let dir = std::env::temp_dir().join(format!(
            "lockstep-testkit-redis-{}-{}",
            std::process::id(),
            SERVER_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok((bin, dir))
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
        let (stdin, pid) = guard_handshake(&mut guard)?;
        let mut server = RedisServer {
            guard: Some(guard),
            stdin,
            pid,
            port,
            dir: dir.to_owned(),
            args: args.to_vec(),
            conf: conf.map(str::to_owned),
        };
        if ready_within(STARTUP_DEADLINE, || ping(port), || server.is_running()) {
            return Ok(server);
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
    /// port, directory and arguments (an empty dataset unless the arguments
    /// turn persistence on).
    ///
    /// # Panics
    ///
    /// When it does not come back (with its log).
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// [`restart`](Self::restart), returning why instead of panicking.
    ///
    /// # Errors
    ///
    /// The server's log when it did not come back within a second.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.stop();
        let bin = server_bin().ok_or_else(missing_redis_help)?;
        let mut last_log = String::new();
        for _ in 0..20 {
            match Self::spawn(&bin, &self.dir, self.port, &self.args, self.conf.as_deref()) {
                Ok(fresh) => {
                    // The old value's Drop must not remove the directory
                    // the fresh server now uses.
                    let mut old = std::mem::replace(self, fresh);
                    old.dir = PathBuf::new();
                    return Ok(());
                }
                // The port can linger for a moment after the kill.
                Err(log) => last_log = log,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "redis-server did not restart on port {}; its log:\n{last_log}",
            self.port
        ))
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

static SERVER_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Makes every server of this process start from `bin` (the command line's
/// `--redis-server-bin`). A name without a `/` is looked up in `PATH`.
/// Only the first call counts.
pub fn set_server_bin(bin: impl Into<PathBuf>) {
    let bin = bin.into();
    let found = if bin.components().count() == 1 {
        search_path(&bin.to_string_lossy()).unwrap_or(bin)
    } else {
        bin
    };
    let _ = SERVER_BIN.set(found);
}

/// The redis-server binary, if there is one: the one given to
/// [`set_server_bin`], else `LOCKSTEP_REDIS_SERVER_BIN`, else `redis-server`
/// in `PATH` (or `/usr/sbin`, `/usr/local/bin`).
pub fn server_bin() -> Option<PathBuf> {
    if let Some(bin) = SERVER_BIN.get() {
        return Some(bin.clone());
    }
    if let Ok(bin) = std::env::var("LOCKSTEP_REDIS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "LOCKSTEP_REDIS_SERVER_BIN={} is not a file",
            bin.display()
        );
        return Some(bin);
    }
    search_path("redis-server")
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What to do when no Redis is found.
pub fn missing_redis_help() -> String {
    "These tests need a real Redis, and none was found.\n\
     Do one of:\n\
     - install redis-server: `sudo apt-get install -y redis-server` (Debian/Ubuntu), \
       `brew install redis` (macOS); or run `scripts/test`, which installs it where it can;\n\
     - point LOCKSTEP_REDIS_SERVER_BIN at a redis-server binary;\n\
     - set REDIS_URL to a Redis you run (tests use random key namespaces and never flush it);\n\
     - with Docker running, add `--features lockstep-testkit/testcontainers`."
        .to_owned()
}

/// Where the shared Redis of this test binary is.
enum Shared {
    Url(String),
    Spawned(RedisServer),
    #[cfg(feature = "testcontainers")]
    Container {
        url: String,
        /// Kept alive: dropping it stops the container.
        _container: Box<dyn std::any::Any + Send + Sync>,
    },
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
        if let Some((url, container)) = crate::docker::start() {
            return Shared::Container {
                url,
                _container: container,
            };
        }
        panic!("{}", missing_redis_help());
    });
    match shared {
        Shared::Url(url) => url.clone(),
        Shared::Spawned(server) => server.url(),
        #[cfg(feature = "testcontainers")]
        Shared::Container { url, .. } => url.clone(),
    }
}

/// Our end of a guard's stdin (closing it stops the server) and the pid
/// the guard printed first, for a guard spawned with both piped.
pub(crate) fn guard_handshake(guard: &mut Child) -> Result<(Option<ChildStdin>, u32), String> {
    let stdin = guard.stdin.take();
    let mut stdout = BufReader::new(guard.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).map_err(|e| e.to_string())?;
    let pid = line
        .trim()
        .parse()
        .map_err(|_| format!("no pid from the guard: {line:?}"))?;
    Ok((stdin, pid))
}

/// Polls `ready` every 10 ms until it holds (true), the process is gone
/// (`alive` false) or `limit` has passed (false).
pub(crate) fn ready_within(
    limit: Duration,
    mut ready: impl FnMut() -> bool,
    mut alive: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if !alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
