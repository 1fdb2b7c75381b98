//! A private PostgreSQL server for tests, and the PostgreSQL shared by one
//! test binary. The model is the redis-server launcher (`server.rs`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::free_port;
use crate::server::{guard_handshake, ready_within};

/// A PostgreSQL server (a postmaster and its children) with its own data
/// directory, stopped when dropped.
///
/// `postgres` runs in the foreground under a small `sh` guard, as
/// redis-server does in [`RedisServer`](crate::RedisServer): the guard
/// kills the postmaster and its children with SIGKILL as soon as our end of
/// its stdin closes, which happens when this value is dropped *or* when the
/// test process exits in any way, and then removes the directory. A server
/// started for a whole test binary therefore never outlives it.
///
/// initdb and postgres refuse to run as root: as root, the guard (hence
/// initdb and postgres) runs as the `postgres` user through `runuser`, or
/// as `nobody` when there is no `postgres` user, and the directory belongs
/// to that user.
#[derive(Debug)]
pub struct PostgresServer {
    guard: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The postmaster's process id, for fault injection (SIGSTOP, SIGKILL).
    /// Killing it alone leaves its children to notice and exit by
    /// themselves, as after a real crash.
    pub pid: u32,
    /// Its loopback port.
    pub port: u16,
    /// Its directory: the data directory `data/`, the log `postgres.log`
    /// and the Unix socket. Removed when dropped.
    pub dir: PathBuf,
    bin: PathBuf,
    user: Option<String>,
}

/// How long a server may take to accept connections (crash recovery
/// included, on a loaded 2-core CI machine).
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// Unix socket paths are limited to 107 bytes, `.s.PGSQL.NNNNN` included.
const MAX_SOCKET_DIR_LEN: usize = 90;

static SERVER_SEQ: AtomicU32 = AtomicU32::new(0);

/// The guard: starts the program given after the directory and the log
/// file, prints its pid, reads one line (or EOF) from stdin, then kills the
/// postmaster and its children with SIGKILL, and removes the directory
/// unless the line was `keep`.
///
/// It ignores SIGHUP: when the test process exits, the guard's process
/// group is orphaned, and the kernel sends SIGHUP to such a group if a
/// member is stopped (a postmaster under SIGSTOP from a test), which would
/// kill the guard before it kills the server. For the same reason it never
/// stops the postmaster itself.
const GUARD: &str = r#"dir="$1"; log="$2"; bin="$3"; shift 3
"$bin" "$@" </dev/null >>"$log" 2>&1 &
pid=$!
trap '' HUP
echo "$pid"
read -r cmd
kids=$(pgrep -P "$pid" 2>/dev/null)
kill -KILL "$pid" 2>/dev/null
[ -z "$kids" ] || kill -KILL $kids 2>/dev/null
wait "$pid" 2>/dev/null
[ "$cmd" = keep ] || rm -rf "$dir"
"#;

impl PostgresServer {
    /// Starts a server on a free loopback port in a fresh directory.
    ///
    /// # Panics
    ///
    /// As [`try_start`](Self::try_start) errs.
    pub fn start() -> PostgresServer {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start`](Self::start), returning why instead of panicking.
    ///
    /// # Errors
    ///
    /// No PostgreSQL binaries ([`missing_postgres_help`]), initdb's output
    /// when it fails, or the server's log when it does not start.
    pub fn try_start() -> Result<PostgresServer, String> {
        let bin = pg_bin_dir().ok_or_else(|| missing_postgres_help().to_owned())?;
        let user = run_as_user()?;
        let dir = std::env::temp_dir().join(format!(
            "lockstep-testkit-pg-{}-{}",
            std::process::id(),
            SERVER_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cleanup = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        if let Some(user) = &user {
            let out = Command::new("chown")
                .arg(user)
                .arg(&dir)
                .output()
                .map_err(|e| cleanup(format!("cannot run chown: {e}")))?;
            if !out.status.success() {
                return Err(cleanup(format!(
                    "chown {user} {} failed: {}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        initdb(&bin, &dir, user.as_deref()).map_err(cleanup)?;
        // A port picked by binding port 0 can be taken by someone else
        // before postgres binds it: try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            match Self::spawn(&bin, &dir, free_port(), user.as_deref()) {
                Ok(server) => return Ok(server),
                Err(log) => last_log = log,
            }
        }
        Err(cleanup(format!(
            "postgres did not start; its log:\n{}",
            tail(&last_log)
        )))
    }

    /// One attempt to run postgres on `port` over the data directory in
    /// `dir`: the log if it did not start.
    fn spawn(
        bin: &Path,
        dir: &Path,
        port: u16,
        user: Option<&str>,
    ) -> Result<PostgresServer, String> {
        let log = dir.join("postgres.log");
        let socket_dir = if dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
            dir.to_string_lossy().into_owned()
        } else {
            String::new()
        };
        let mut command = as_user(user, "sh");
        command
            .arg("-c")
            .arg(GUARD)
            .arg("sh")
            .arg(dir)
            .arg(&log)
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &port.to_string()]);
        for setting in [
            "listen_addresses=127.0.0.1",
            &format!("unix_socket_directories={socket_dir}"),
            "fsync=off",
            // On: with fsync off a commit costs one write(2), no flush, and
            // survives a SIGKILL of the server (off would lose the last
            // ~0.6 s of commits to a kill + restart).
            "synchronous_commit=on",
            "full_page_writes=off",
            "max_connections=200",
            "logging_collector=off",
            "log_destination=stderr",
        ] {
            command.args(["-c", setting]);
        }
        command
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut guard = command
            .spawn()
            .map_err(|e| format!("cannot run the guard sh: {e}"))?;
        let (stdin, pid) = guard_handshake(&mut guard)?;
        let mut server = PostgresServer {
            guard: Some(guard),
            stdin,
            pid,
            port,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            user: user.map(str::to_owned),
        };
        if ready_within(STARTUP_DEADLINE, || ping(port), || server.is_running()) {
            return Ok(server);
        }
        let log = server.log();
        // Keep the directory: the caller retries on another port or
        // removes it.
        server.kill();
        // The data directory is the caller's: this value must not remove it.
        server.dir = PathBuf::new();
        Err(log)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// The directory holding `postgres`, `psql` and friends.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Runs `sql` with psql (`-X -A -t`, stopping at the first error):
    /// its output, or its error output when it fails.
    ///
    /// # Errors
    ///
    /// psql's error output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Whether the postmaster still exists.
    pub fn is_running(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .unwrap_or_default()
                .contains(") Z ")
    }

    /// Sends a signal to the postmaster (e.g. "STOP", "CONT", "KILL").
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Kills the server (the postmaster and its children) with SIGKILL and
    /// waits for the postmaster; the directory stays, for
    /// [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"keep\n");
        }
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.wait();
        }
    }

    /// Kills the server if it runs and starts it again on the same port and
    /// data directory (PostgreSQL runs crash recovery by itself after a
    /// kill): what was committed before is still there.
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
    /// The tail of the server's log when it did not come back.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        let mut last_log = String::new();
        for _ in 0..20 {
            match Self::spawn(&self.bin, &self.dir, self.port, self.user.as_deref()) {
                Ok(fresh) => {
                    // The old value's Drop must not remove the directory
                    // the fresh server now uses.
                    let mut old = std::mem::replace(self, fresh);
                    old.dir = PathBuf::new();
                    return Ok(());
                }
                // The port or the old shared memory can linger for a moment
                // after the kill.
                Err(log) => last_log = log,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "postgres did not restart on port {}; its log:\n{}",
            self.port,
            tail(&last_log)
        ))
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // EOF: the guard kills the server and removes the directory.
        drop(self.stdin.take());
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.wait();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last lines of a log, for error messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `initdb` into `dir/data`, as `user` if given.
fn initdb(bin: &Path, dir: &Path, user: Option<&str>) -> Result<(), String> {
    let out = as_user(user, &bin.join("initdb").to_string_lossy())
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .args(["-E", "UTF8", "--locale=C"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run initdb: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `program`, run as `user` through `runuser` when given.
fn as_user(user: Option<&str>, program: &str) -> Command {
    match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", program]);
            c
        }
        None => Command::new(program),
    }
}

/// Who runs initdb and postgres: `None` for ourselves, or as root the
/// `postgres` user if there is one, else `nobody`.
fn run_as_user() -> Result<Option<String>, String> {
    if !is_root() {
        return Ok(None);
    }
    static USER: OnceLock<Result<Option<String>, String>> = OnceLock::new();
    USER.get_or_init(|| {
        let user = ["postgres", "nobody"]
            .into_iter()
            .find(|u| {
                Command::new("id")
                    .args(["-u", u])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or(
                "running as root, and neither a `postgres` nor a `nobody` user exists \
                    to run initdb and postgres as",
            )?;
        if Command::new("runuser").arg("--help").output().is_err() {
            return Err(format!(
                "running as root: initdb and postgres must run as `{user}`, \
                 but there is no runuser (util-linux)"
            ));
        }
        Ok(Some(user.to_owned()))
    })
    .clone()
}

fn is_root() -> bool {
    match std::fs::metadata("/proc/self") {
        Ok(m) => m.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
    }
}

/// Whether the server on `port` accepts connections: a startup message
/// (protocol 3.0, user and database `postgres`) answered by an
/// authentication request rather than an error ("the database system is
/// starting up").
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut msg = Vec::with_capacity(8 + params.len());
    msg.extend_from_slice(&((8 + params.len()) as u32).to_be_bytes());
    msg.extend_from_slice(&196_608u32.to_be_bytes());
    msg.extend_from_slice(params);
    if s.write_all(&msg).is_err() {
        return false;
    }
    let mut kind = [0u8; 1];
    let up = s.read_exact(&mut kind).is_ok() && kind[0] == b'R';
    if up {
        // Terminate, so that the server does not log an unexpected EOF.
        let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
    }
    up
}

/// The directory of the PostgreSQL binaries (`initdb`, `postgres`, `psql`):
/// `LOCKSTEP_PG_BIN_DIR`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`. `None` when none holds initdb and postgres.
///
/// # Panics
///
/// When `LOCKSTEP_PG_BIN_DIR` is set to a directory without them.
pub fn pg_bin_dir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(dir) = std::env::var("LOCKSTEP_PG_BIN_DIR")
        && !dir.is_empty()
    {
        let dir = PathBuf::from(dir);
        assert!(
            has_server(&dir),
            "LOCKSTEP_PG_BIN_DIR={} holds no initdb and postgres",
            dir.display()
        );
        return Some(dir);
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Some(dir);
        }
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: Vec<u32> = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .max()
        .map(|(_, d)| d)
}

/// What to do when no PostgreSQL is found.
pub fn missing_postgres_help() -> &'static str {
    "These tests need a real PostgreSQL, and none was found.\n\
     Do one of:\n\
     - install it: `sudo apt-get install -y postgresql` (Debian/Ubuntu), \
       `brew install postgresql` (macOS);\n\
     - point LOCKSTEP_PG_BIN_DIR at the directory holding initdb, postgres and psql;\n\
     - set LOCKSTEP_POSTGRES_URL to a PostgreSQL you run (tests work in a schema of \
       their own and drop only what they create)."
}

/// Where the shared PostgreSQL of this test binary is.
enum Shared {
    Url(String),
    /// Never dropped (a static): the guard kills it when the process exits.
    Spawned(PostgresServer),
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The URL of the PostgreSQL shared by this test binary:
/// `LOCKSTEP_POSTGRES_URL` when set, else a private server started on first
/// use and killed (its directory removed) when the process exits.
///
/// # Panics
///
/// When no PostgreSQL is found ([`missing_postgres_help`]) or it does not
/// start.
pub fn shared_postgres_url() -> String {
    let shared = SHARED.get_or_init(|| {
        if let Ok(url) = std::env::var("LOCKSTEP_POSTGRES_URL")
            && !url.is_empty()
        {
            return Shared::Url(url);
        }
        Shared::Spawned(PostgresServer::start())
    });
    match shared {
        Shared::Url(url) => url.clone(),
        Shared::Spawned(server) => server.url(),
    }
}

/// A schema a test makes on a PostgreSQL it may share with others: a
/// name of its own (`<prefix>_<random>`), dropped with everything in it
/// when the guard drops (`DROP SCHEMA ... CASCADE`, by psql), so that a
/// shared server keeps only what it had.
#[derive(Debug)]
pub struct OwnSchema {
    url: String,
    name: String,
}

impl OwnSchema {
    /// A fresh schema name on the server at `url` (nothing is created: the
    /// code under test creates it).
    pub fn new(url: &str, prefix: &str) -> OwnSchema {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(N.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        OwnSchema {
            url: url.to_owned(),
            name: format!("{prefix}_{:016x}", h.finish()),
        }
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `sql` on the schema's server with psql (`-X -A -t`, stopping
    /// at the first error): its output, or psql's error output.
    ///
    /// # Errors
    ///
    /// psql's error output, or why it could not be run.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let out = psql_command(&self.url)
            .args(["-A", "-t", "-c", sql])
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

/// psql on `url` (`-X -q`, stopping at the first error, a 10 s connect
/// timeout, no standard input), for the caller's arguments.
fn psql_command(url: &str) -> Command {
    let psql = pg_bin_dir().map_or_else(|| PathBuf::from("psql"), |d| d.join("psql"));
    let mut cmd = Command::new(psql);
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
    cmd
}

impl Drop for OwnSchema {
    fn drop(&mut self) {
        let sql = format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.name
        );
        let out = psql_command(&self.url).args(["-c", &sql]).output();
        match out {
            Ok(o) if o.status.success() => {}
            // A server the test stopped took the schema with it; anything
            // else is worth a line, not a panic in a drop.
            Ok(o) => eprintln!(
                "could not drop test schema {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("could not run psql to drop test schema {}: {e}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn gone_within(pid: u32, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
            if stat.is_err() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn children(pid: u32) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                // pid (comm) state ppid ...: comm may hold spaces.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
            .collect()
    }

    #[test]
    fn starts_and_answers() {
        let t = Instant::now();
        let pg = PostgresServer::start();
        eprintln!("PostgresServer::start() took {:?}", t.elapsed());
        assert_eq!(pg.psql("select 1").unwrap().trim(), "1");
        assert!(pg.url().ends_with(&format!(":{}/postgres", pg.port)));
        // Only loopback TCP, and the settings given.
        assert_eq!(
            pg.psql("show listen_addresses").unwrap().trim(),
            "127.0.0.1"
        );
        assert_eq!(pg.psql("show fsync").unwrap().trim(), "off");
        assert_eq!(pg.psql("show max_connections").unwrap().trim(), "200");
    }

    #[test]
    fn two_servers_get_different_ports() {
        let a = PostgresServer::start();
        let b = PostgresServer::start();
        assert_ne!(a.port, b.port);
        assert_ne!(a.dir, b.dir);
        a.psql("create table only_in_a (x int)").unwrap();
        assert_eq!(
            b.psql("select count(*) from pg_tables where tablename = 'only_in_a'")
                .unwrap()
                .trim(),
            "0"
        );
    }

    #[test]
    fn drop_kills_it_and_removes_the_directory() {
        let pg = PostgresServer::start();
        let (pid, dir) = (pg.pid, pg.dir.clone());
        let kids = children(pid);
        assert!(!kids.is_empty(), "a postmaster has children");
        assert!(dir.join("data").is_dir());
        drop(pg);
        assert!(!dir.exists(), "{} still exists", dir.display());
        for p in std::iter::once(pid).chain(kids) {
            assert!(
                gone_within(p, Duration::from_secs(10)),
                "{p} is still there"
            );
        }
    }

    #[test]
    fn kill_and_restart_keep_committed_data() {
        let mut pg = PostgresServer::start();
        let port = pg.port;
        pg.psql("create table survives (x int); insert into survives values (42)")
            .unwrap();
        let old = pg.pid;
        pg.kill();
        assert!(gone_within(old, Duration::from_secs(10)));
        assert!(pg.dir.join("data").is_dir(), "kill leaves the directory");
        assert!(pg.psql("select 1").is_err());
        let t = Instant::now();
        pg.restart();
        eprintln!("restart after a kill took {:?}", t.elapsed());
        assert_eq!(pg.port, port);
        assert_ne!(pg.pid, old);
        assert_eq!(pg.psql("select x from survives").unwrap().trim(), "42");
    }

    #[test]
    fn restart_after_the_postmaster_alone_is_killed() {
        let mut pg = PostgresServer::start();
        pg.psql("create table t (x int); insert into t values (7)")
            .unwrap();
        // A crash: the children must notice by themselves.
        pg.signal("KILL");
        // A zombie until the guard reaps it.
        let end = Instant::now() + Duration::from_secs(10);
        while pg.is_running() {
            assert!(Instant::now() < end, "the postmaster survived SIGKILL");
            std::thread::sleep(Duration::from_millis(5));
        }
        pg.restart();
        assert_eq!(pg.psql("select x from t").unwrap().trim(), "7");
    }

    /// Both with the postmaster running and stopped (SIGSTOP): the guard
    /// kills it and removes its directory when the process that started it
    /// exits without dropping it (as the shared server, a static).
    #[test]
    fn the_server_dies_with_the_test_process() {
        const CHILD: &str = "LOCKSTEP_TESTKIT_PG_CHILD";
        if let Ok(mode) = std::env::var(CHILD) {
            let pg = PostgresServer::start();
            if mode == "stopped" {
                pg.signal("STOP");
            }
            println!("PG {} {}", pg.pid, pg.dir.display());
            std::io::stdout().flush().unwrap();
            std::process::exit(0);
        }
        for mode in ["running", "stopped"] {
            let out = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "postgres::tests::the_server_dies_with_the_test_process",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env(CHILD, mode)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout
                .lines()
                .find_map(|l| Some(l.split_once("PG ")?.1))
                .unwrap_or_else(|| {
                    panic!(
                        "no server from the child: {stdout}{}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            let (pid, dir) = line.split_once(' ').unwrap();
            let (pid, dir): (u32, PathBuf) = (pid.parse().unwrap(), dir.into());
            assert!(
                gone_within(pid, Duration::from_secs(10)),
                "{mode}: {pid} outlived its test process"
            );
            let end = Instant::now() + Duration::from_secs(10);
            while dir.exists() {
                assert!(
                    Instant::now() < end,
                    "{mode}: {} was not removed",
                    dir.display()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn shared_url_is_one_server() {
        let url = shared_postgres_url();
        assert_eq!(url, shared_postgres_url());
        assert!(url.starts_with("postgres://"));
    }
}
