//! `lockstep run`, run as a cron job would run it: the binary, its child
//! commands (`sh -c` scripts) and its exit statuses, against a private
//! redis-server per test, paused with SIGSTOP where a lease must be lost.
//! Conditions are polled with deadlines; the scripts tell what they did
//! through files in the server's directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use lockstep_testkit::RedisServer;

/// A `lockstep run` process, and what it has said on stderr so far.
struct Run {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    /// Starts `lockstep run` on `server` with `args` (options, the key,
    /// `--` and the command).
    fn start(server: &RedisServer, args: &[&str]) -> Run {
        let mut child = lockstep(server, args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockstep run");
        let pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let collected = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                let mut text = collected.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Run {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has said on stderr so far.
    fn said(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until it has said `text` on stderr (at most 20 s).
    fn wait_to_say(&self, text: &str) {
        eventually(Duration::from_secs(20), text, || self.said().contains(text));
    }

    /// Waits for it to end, at most `deadline`: its status and stderr.
    fn finish(mut self, deadline: Duration) -> (ExitStatus, String) {
        let end = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "lockstep run (pid {}) still running after {deadline:?}; stderr:\n{}",
                    self.child.id(),
                    self.said()
                );
            }
            sleep(Duration::from_millis(10));
        };
        // The pipe closes when the last process holding it (the command's
        // too) has ended.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.said())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `lockstep run --redis-url <server> args...`, not yet started.
fn lockstep(server: &RedisServer, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    command
        .arg("run")
        .args(["--redis-url", &server.url()])
        .args(args)
        .env_remove("LOCKING_REDIS_URL");
    command
}

/// Runs `lockstep run` to its end (at most 30 s): its status and stderr.
fn run_to_end(server: &RedisServer, args: &[&str]) -> (ExitStatus, String) {
    Run::start(server, args).finish(Duration::from_secs(30))
}

/// `lockstep` with `args` and no backend at all: its status and stderr.
fn lockstep_alone(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env_remove("LOCKING_REDIS_URL")
        .output()
        .expect("run lockstep");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file in the server's directory (removed with the server).
fn file(server: &RedisServer, name: &str) -> PathBuf {
    server.dir.join(name)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A `lockstep run` holding `key` with a command that runs until the
/// returned file exists; returned once the command runs.
fn hold_until_told(server: &RedisServer, key: &str) -> (Run, PathBuf) {
    let (started, done) = (file(server, "started"), file(server, "done"));
    let script = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done",
        path(&started),
        path(&done)
    );
    let holder = Run::start(server, &[key, "--", "sh", "-c", &script]);
    eventually(Duration::from_secs(20), "the holder's command runs", || {
        started.exists()
    });
    (holder, done)
}

/// Polls `check` every 10 ms until it holds; panics with `what` after
/// `deadline`.
fn eventually(deadline: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !check() {
        assert!(Instant::now() < end, "timed out after {deadline:?}: {what}");
        sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` is gone (or a zombie: dead, not yet reaped).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.contains(") Z ") || stat.contains(") X "),
    }
}

/// The pid a script wrote to `pidfile`, once it has.
fn pid_in(pidfile: &Path) -> u32 {
    let mut pid = None;
    eventually(Duration::from_secs(20), "the command wrote its pid", || {
        pid = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

/// Three runs on one key, started together, each appending `start <pid>`,
/// then after 200 ms `end <pid>`, to one file: the file shows three whole
/// turns, one after the other, and every run exits 0.
#[test]
fn runs_on_one_key_take_turns() {
    let server = RedisServer::start(&[]);
    let log = file(&server, "turns.log");
    let script = format!(
        "echo \"start $$\" >> '{0}'; sleep 0.2; echo \"end $$\" >> '{0}'",
        path(&log)
    );
    let runs: Vec<Run> = (0..3)
        .map(|_| {
            Run::start(
                &server,
                &["--wait", "20s", "turns", "--", "sh", "-c", &script],
            )
        })
        .collect();
    for run in runs {
        let (status, stderr) = run.finish(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "three turns: {text}");
    let mut pids = Vec::new();
    for turn in lines.chunks(2) {
        let start = turn[0].strip_prefix("start ").expect(&text);
        let end = turn[1].strip_prefix("end ").expect(&text);
        assert_eq!(start, end, "a turn was interleaved with another: {text}");
        pids.push(start);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three different commands: {text}");
}

/// The command's status is `lockstep run`'s; it sees the key and a
/// numeric fencing token in its environment, and a later run a higher
/// token.
#[test]
fn the_command_gets_the_token_and_its_status_is_passed_through() {
    let server = RedisServer::start(&[]);
    let env = file(&server, "env");
    let script = format!(
        "echo \"$LOCKSTEP_FENCING_TOKEN $LOCKSTEP_KEY\" >> '{}'; exit 7",
        path(&env)
    );
    let token = |line: &str| -> u64 {
        let (token, key) = line.split_once(' ').expect(line);
        assert_eq!(key, "tokens");
        token
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"))
    };
    for _ in 0..2 {
        let (status, stderr) = run_to_end(&server, &["tokens", "--", "sh", "-c", &script]);
        assert_eq!(status.code(), Some(7), "stderr: {stderr}");
        assert_eq!(stderr, "", "nothing said without --verbose");
    }
    let text = std::fs::read_to_string(&env).unwrap();
    let tokens: Vec<u64> = text.lines().map(token).collect();
    assert_eq!(tokens.len(), 2, "{text}");
    assert!(tokens[0] > 0 && tokens[1] > tokens[0], "{text}");

    let (status, _) = run_to_end(&server, &["signalled", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(status.code(), Some(128 + 9), "as a shell reports SIGKILL");
}

/// While one run holds the key, another with `--wait 0s` exits at once
/// with the conflict status (75, or `--conflict-exit-code`), one with a
/// short wait after it; the command of neither is run.
#[test]
fn a_held_key_gives_the_conflict_status() {
    let server = RedisServer::start(&[]);
    let (holder, done) = hold_until_told(&server, "busy");
    let ran = file(&server, "ran");
    let ran = path(&ran);

    let began = Instant::now();
    let (status, stderr) = run_to_end(&server, &["--wait", "0s", "busy", "--", "touch", ran]);
    assert_eq!(status.code(), Some(75), "stderr: {stderr}");
    assert!(stderr.contains("held by someone else"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );

    let (status, stderr) = run_to_end(
        &server,
        &[
            "--wait",
            "0s",
            "--conflict-exit-code",
            "9",
            "busy",
            "--",
            "touch",
            ran,
        ],
    );
    assert_eq!(status.code(), Some(9), "stderr: {stderr}");

    let began = Instant::now();
    let (status, stderr) = run_to_end(&server, &["--wait", "300ms", "busy", "--", "touch", ran]);
    assert_eq!(status.code(), Some(75), "stderr: {stderr}");
    assert!(
        began.elapsed() >= Duration::from_millis(300),
        "gave up after {:?}",
        began.elapsed()
    );
    assert!(!Path::new(ran).exists(), "no command ran without the lock");

    std::fs::write(&done, "").unwrap();
    let (status, stderr) = holder.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

/// Redis paused (SIGSTOP) past a 1 s lease: the renewals go unanswered,
/// the lease runs out, and `lockstep run` stops its command (SIGTERM)
/// while Redis is still paused, then exits 76 although the command's own
/// status would be 143. The key is free afterwards.
#[test]
fn a_lost_lease_stops_the_command() {
    let server = RedisServer::start(&[]);
    let pidfile = file(&server, "pid");
    let script = format!("echo $$ > '{}'; exec sleep 60", path(&pidfile));
    let began = Instant::now();
    let run = Run::start(
        &server,
        &["--ttl", "1s", "-v", "lease", "--", "sh", "-c", &script],
    );
    let command = pid_in(&pidfile);

    server.signal("STOP");
    let paused = Instant::now();
    let stopped = std::panic::catch_unwind(|| {
        eventually(
            Duration::from_secs(10),
            "the command is stopped while Redis is paused",
            || is_gone(command),
        );
    });
    // Paused until 3 s past the lease, then resumed however it went.
    sleep(Duration::from_secs(4).saturating_sub(paused.elapsed()));
    server.signal("CONT");
    if let Err(panic) = stopped {
        eprintln!("lockstep run said:\n{}", run.said());
        std::panic::resume_unwind(panic);
    }

    // All of it within 30 s.
    let (status, stderr) = run.finish(Duration::from_secs(30).saturating_sub(began.elapsed()));
    assert_eq!(status.code(), Some(76), "stderr: {stderr}");
    assert!(stderr.contains("lost the lock on \"lease\""), "{stderr}");
    assert!(
        stderr.contains("stopped (status 143)"),
        "by SIGTERM: {stderr}"
    );
    assert!(is_gone(command));

    let (status, stderr) = run_to_end(&server, &["--wait", "0s", "lease", "--", "true"]);
    assert_eq!(status.code(), Some(0), "the key is free: {stderr}");
}

/// A command that ignores SIGTERM is killed (SIGKILL) `--grace` after the
/// lease was lost.
#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let server = RedisServer::start(&[]);
    let pidfile = file(&server, "pid");
    let script = format!(
        "trap '' TERM; echo $$ > '{}'; exec sleep 60",
        path(&pidfile)
    );
    let run = Run::start(
        &server,
        &[
            "--ttl", "1s", "--grace", "500ms", "-v", "stubborn", "--", "sh", "-c", &script,
        ],
    );
    let command = pid_in(&pidfile);
    server.signal("STOP");
    let stopped = std::panic::catch_unwind(|| {
        eventually(
            Duration::from_secs(10),
            "the command is killed while Redis is paused",
            || is_gone(command),
        );
    });
    server.signal("CONT");
    if let Err(panic) = stopped {
        eprintln!("lockstep run said:\n{}", run.said());
        std::panic::resume_unwind(panic);
    }
    let (status, stderr) = run.finish(Duration::from_secs(30));
    assert_eq!(status.code(), Some(76), "stderr: {stderr}");
    assert!(
        stderr.contains("stopped (status 137)"),
        "by SIGKILL: {stderr}"
    );
}

/// SIGTERM sent to `lockstep run` reaches the command, whose trap ends it
/// with 3: `lockstep run` exits 3, and has released the key.
#[test]
fn sigterm_is_passed_on_to_the_command() {
    let server = RedisServer::start(&[]);
    let (started, got) = (file(&server, "started"), file(&server, "got"));
    // Traps run between commands, so the loop sleeps in short steps.
    let script = format!(
        "trap 'echo got-term >> \"{}\"; exit 3' TERM; touch '{}'; while :; do sleep 0.05; done",
        path(&got),
        path(&started)
    );
    let run = Run::start(&server, &["-v", "forwarded", "--", "sh", "-c", &script]);
    eventually(Duration::from_secs(20), "the command runs", || {
        started.exists()
    });
    let ok = Command::new("kill")
        .args(["-TERM", &run.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (status, stderr) = run.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "got-term\n");
    assert!(
        stderr.contains("passed SIGTERM on to the command"),
        "{stderr}"
    );

    let (status, stderr) = run_to_end(&server, &["--wait", "0s", "forwarded", "--", "true"]);
    assert_eq!(status.code(), Some(0), "the key was released: {stderr}");
}

/// SIGINT while waiting for the lock ends `lockstep run` with 130 without
/// running the command, and withdraws it from the wait: the key is free
/// once its holder is done.
#[test]
fn sigint_while_waiting_gives_up_without_running_the_command() {
    let server = RedisServer::start(&[]);
    let (holder, done) = hold_until_told(&server, "queue");
    let ran = file(&server, "ran");
    let waiter = Run::start(
        &server,
        &["-v", "--wait", "60s", "queue", "--", "touch", path(&ran)],
    );
    // Said once connected and listening for signals, as the wait begins.
    waiter.wait_to_say("taking the lock on \"queue\" (waiting up to 1m)");
    let ok = Command::new("kill")
        .args(["-INT", &waiter.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (status, stderr) = waiter.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "stderr: {stderr}");
    assert!(
        stderr.contains("SIGINT while waiting for the lock on \"queue\""),
        "{stderr}"
    );
    std::fs::write(&done, "").unwrap();
    let (status, _) = holder.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(!ran.exists(), "the waiter's command never ran");
    let (status, stderr) = run_to_end(&server, &["--wait", "0s", "queue", "--", "true"]);
    assert_eq!(status.code(), Some(0), "nobody holds the key: {stderr}");
}

/// Bad durations, a missing command or backend: status 2 and a message
/// that says what is wrong, never a panic. A command that does not exist:
/// 127, as in a shell.
#[test]
fn bad_input_is_a_usage_error() {
    let server = RedisServer::start(&[]);
    let cases: [(&[&str], &str); 6] = [
        (&["--ttl", "0s", "k", "--", "true"], "longer than zero"),
        (&["--ttl", "30", "k", "--", "true"], "has no unit"),
        (&["--wait", "5x", "k", "--", "true"], "unknown unit"),
        (&["--grace", "soon", "k", "--", "true"], "is not a duration"),
        (&["k", "--"], "<CMD>"),
        (&["k"], "<CMD>"),
    ];
    for (args, says) in cases {
        let out = lockstep(&server, args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    let (status, stderr) = lockstep_alone(&["run", "k", "--", "true"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs a shared backend"), "{stderr}");
    assert!(stderr.contains("--redis-url"), "{stderr}");

    let (status, stderr) = run_to_end(&server, &["k", "--", "/nonexistent/command"]);
    assert_eq!(status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("cannot run /nonexistent/command"),
        "{stderr}"
    );
}
