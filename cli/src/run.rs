//! `lockstep run KEY -- CMD [ARGS...]`: run a command while holding a lock,
//! for cron jobs and deploy scripts that must not overlap across machines
//! (what `flock(1)` does on one machine, or `consul lock` with Consul).
//!
//! It is `execute` around a child process: the lock is taken (waiting up
//! to `--wait`), the command runs with the fencing token in its
//! environment, the lease is renewed while it runs, and the lock is
//! released when it ends. If the lease is lost (a renewal found the lock
//! gone, or Redis did not answer until the lease ran out), someone else may
//! now hold the lock, so the command is stopped: SIGTERM, then SIGKILL
//! after `--grace`. SIGINT and SIGTERM sent to `lockstep run` are passed on
//! to the command, which decides when to end; the lock is held until it
//! has.
//!
//! Exit statuses: the command's own (128 + the signal's number when a
//! signal ended it, as shells report it); [`EXIT_CONFLICT`] (or
//! `--conflict-exit-code`) when the lock stayed held by someone else for
//! the whole wait; [`EXIT_LEASE_LOST`] when the lease was lost while the
//! command ran, whatever the command's status; 126 / 127 when the command
//! cannot be run / is not found (as shells do); 2 on bad usage or an
//! unreachable backend.

use std::cell::Cell;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use lockstep::{ExecuteOptions, Held, LockError, LockingModule};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use crate::backend::{self, BackendArgs};
use crate::failure::{CommandResult, EXIT_WRONG, Failure};

/// The lock stayed held by someone else for the whole `--wait`
/// (`EX_TEMPFAIL` of sysexits.h: try again later). `--conflict-exit-code`
/// changes it.
pub(crate) const EXIT_CONFLICT: u8 = 75;
/// The lease was lost while the command ran; the command was stopped.
pub(crate) const EXIT_LEASE_LOST: u8 = 76;
/// The command was found but could not be run (as shells report it).
const EXIT_CANNOT_RUN: u8 = 126;
/// The command was not found (as shells report it).
const EXIT_NOT_FOUND: u8 = 127;

/// The arguments of `lockstep run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The lock: runs with the same key on any machine never overlap.
    pub(crate) key: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<OsString>,
    /// The lease, renewed every third of it while the command runs: how
    /// long the lock outlives a `lockstep run` that dies without releasing.
    #[arg(long, default_value = "30s", value_parser = parse_lease, value_name = "DURATION")]
    pub(crate) ttl: Duration,
    /// How long to wait for a lock held by someone else; 0s tries once.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) wait: Duration,
    /// After a lost lease, how long the command has between SIGTERM and
    /// SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) grace: Duration,
    /// The exit status when the lock stays held by someone else for the
    /// whole wait (75 is EX_TEMPFAIL of sysexits.h: try again later).
    #[arg(long, default_value_t = EXIT_CONFLICT, value_name = "N")]
    pub(crate) conflict_exit_code: u8,
    /// What `lockstep locks list` shows about this run, after its host and
    /// pid (default: `cmd=<program name>`; never the arguments, which may
    /// hold secrets).
    #[arg(long, value_name = "TEXT")]
    pub(crate) label: Option<String>,
    /// Tell on stderr what happens: the wait for the lock, the lock taken
    /// (and its fencing token), the lease lost, signals passed on.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
}

/// Runs the command under the lock; see the module documentation.
pub(crate) async fn run(args: RunArgs) -> CommandResult {
    if !args.backend.is_given() {
        // The in-memory provider (the demo's fallback) would lock only
        // within this process, which excludes no other `lockstep run`.
        return Err(Failure::usage(format!(
            "run needs a shared backend: {}",
            backend::missing()
        )));
    }
    let connected = args.backend.connect().await.map_err(Failure::usage)?.module;
    // The same provider, recording this host and pid with the lock, so that
    // `lockstep locks list` shows who runs what.
    let module = LockingModule::builder()
        .provider_arc("run", Arc::clone(connected.provider(None)?), true)
        .record_holder(true)
        .build()
        .map_err(|e| Failure::usage(e.to_string()))?;
    let result = run_locked(&args, &module).await;
    module.shutdown().await;
    result
}

/// What the lock records about this run: `--label` if given, else
/// `cmd=<program>` (the program's file name only: arguments can hold
/// secrets, and anyone who can list the locks reads this).
fn describe(args: &RunArgs) -> String {
    if let Some(label) = &args.label {
        return label.clone();
    }
    let program = args.command.first().map(std::path::Path::new);
    let name = program
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = name
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(100)
        .collect();
    format!("cmd={name}")
}

/// Where the command is, for the signals `lockstep run` receives.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the lock: a signal ends `lockstep run`, nothing is run.
    Acquiring,
    /// The command runs as this process: signals are passed on.
    Running(u32),
    /// The command has ended (its status, unless it could not be started
    /// or waited for); the lock is being released.
    Ended(Option<Ended>),
}

/// How the command ended.
#[derive(Debug, Clone, Copy)]
struct Ended {
    /// Its status as a shell reports it.
    status: u8,
    /// Whether `lockstep run` stopped it after the lease was lost.
    stopped: bool,
}

async fn run_locked(args: &RunArgs, module: &LockingModule) -> CommandResult {
    let mut interrupts = signal(SignalKind::interrupt()).map_err(signal_failure)?;
    let mut terminations = signal(SignalKind::terminate()).map_err(signal_failure)?;
    // Shared by the job and the signal loop below. Both run in this one
    // task, so the phase cannot change between a look and a use: the job
    // sets `Running` right after the spawn and `Ended` right after the
    // child was reaped, without yielding in between.
    let phase = Cell::new(Phase::Acquiring);
    let options = ExecuteOptions::new()
        .expire(args.ttl)
        .timeout(args.wait)
        .metadata(describe(args));
    let execution = module.execute(args.key.as_str(), options, |held| {
        supervise(args, held, &phase)
    });
    tokio::pin!(execution);
    if args.verbose {
        if args.wait.is_zero() {
            eprintln!("lockstep: taking the lock on {:?} (one attempt)", args.key);
        } else {
            eprintln!(
                "lockstep: taking the lock on {:?} (waiting up to {})",
                args.key,
                show(args.wait)
            );
        }
    }
    let outcome = loop {
        let signal = tokio::select! {
            outcome = &mut execution => break outcome,
            _ = interrupts.recv() => libc::SIGINT,
            _ = terminations.recv() => libc::SIGTERM,
        };
        match phase.get() {
            Phase::Acquiring => {
                // Dropping the execution withdraws the acquisition.
                return Err(Failure {
                    status: by_signal(signal),
                    message: format!(
                        "{} while waiting for the lock on {:?}; the command was not run",
                        signal_name(signal),
                        args.key
                    ),
                });
            }
            Phase::Running(pid) => {
                send_signal(pid, signal);
                if args.verbose {
                    eprintln!(
                        "lockstep: passed {} on to the command (pid {pid})",
                        signal_name(signal)
                    );
                }
            }
            // Releasing, which does not take long: let it finish.
            Phase::Ended(_) => {}
        }
    };
    let ended = match phase.get() {
        Phase::Ended(ended) => ended,
        Phase::Acquiring | Phase::Running(_) => None,
    };
    match outcome {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(failure)) => Err(failure),
        Err(LockError::LeaseLost { .. }) => {
            let what = match ended {
                Some(Ended {
                    status,
                    stopped: true,
                }) => format!("the command was stopped (status {status})"),
                Some(Ended { status, .. }) => format!("the command ended with status {status}"),
                None => "the command's status is unknown".to_owned(),
            };
            Err(Failure {
                status: EXIT_LEASE_LOST,
                message: format!(
                    "lost the lock on {:?} while the command ran; {what}",
                    args.key
                ),
            })
        }
        Err(e) if e.is_contended() => Err(Failure {
            status: args.conflict_exit_code,
            message: format!(
                "the lock on {:?} is held by someone else (waited {})",
                args.key,
                show(args.wait)
            ),
        }),
        Err(e) => Err(Failure::usage(e.to_string())),
    }
}

/// The job under the lock: start the command, wait for it to end, and
/// stop it if the lease is lost. Its status, or why it could not run.
async fn supervise(args: &RunArgs, held: Held, phase: &Cell<Phase>) -> CommandResult {
    let token = held.fencing_token();
    if args.verbose {
        eprintln!(
            "lockstep: acquired {:?} (fencing token {token}, lease {})",
            args.key,
            show(args.ttl)
        );
    }
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let spawned = Command::new(program)
        .args(rest)
        .env("LOCKSTEP_FENCING_TOKEN", token.to_string())
        .env("LOCKSTEP_KEY", &args.key)
        // Only if this future is dropped without waiting for the child
        // (a panic): a command must not outlive the lock it runs under.
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            phase.set(Phase::Ended(None));
            let status = if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            };
            return Err(Failure {
                status,
                message: format!("cannot run {}: {e}", program.to_string_lossy()),
            });
        }
    };
    let pid = child.id().expect("a child not yet waited for has a pid");
    phase.set(Phase::Running(pid));
    let exited = tokio::select! {
        status = child.wait() => Some(status),
        () = held.cancelled() => None,
    };
    let (status, stopped) = match exited {
        Some(status) => (status, false),
        None => {
            if args.verbose {
                eprintln!(
                    "lockstep: lost the lock on {:?}; stopping the command (SIGTERM, SIGKILL after {})",
                    args.key,
                    show(args.grace)
                );
            }
            (stop(&mut child, pid, args.grace).await, true)
        }
    };
    let status = status.map(shell_status);
    phase.set(Phase::Ended(
        status
            .as_ref()
            .ok()
            .map(|&status| Ended { status, stopped }),
    ));
    status.map_err(|e| Failure {
        status: EXIT_WRONG,
        message: format!("lost track of the command (pid {pid}): {e}"),
    })
}

/// Sends SIGTERM to the child, and SIGKILL if it has not ended after
/// `grace`; waits for it.
async fn stop(child: &mut Child, pid: u32, grace: Duration) -> std::io::Result<ExitStatus> {
    send_signal(pid, libc::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_elapsed) => {
            // Fails only if it has just ended, which the wait then reports.
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

/// Sends `signal` to process `pid`. The caller knows the process has not
/// been reaped yet, so the pid cannot name another process. An error (the
/// process has just exited) changes nothing: its end is seen by the wait.
fn send_signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process; it has no memory-safety preconditions.
    let _ = unsafe { libc::kill(pid, signal) };
}

/// A process's status as a shell reports it: its exit code, or 128 + the
/// number of the signal that ended it.
fn shell_status(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        u8::try_from(code).unwrap_or(EXIT_WRONG)
    } else if let Some(signal) = status.signal() {
        by_signal(signal)
    } else {
        EXIT_WRONG
    }
}

/// The status of a process ended by `signal` (128 + its number).
fn by_signal(signal: libc::c_int) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

fn signal_failure(e: std::io::Error) -> Failure {
    Failure::usage(format!("cannot listen for signals: {e}"))
}

/// The units of a duration, in milliseconds.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// A duration written as a whole number and a unit: `500ms`, `30s`, `2m`,
/// `1h`; `0s` is zero. At most [`lockstep::MAX_DURATION`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let form = "write a whole number and a unit: ms, s, m or h (500ms, 30s, 2m, 1h)";
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("{text:?} is not a duration: {form}"));
    }
    let Some(&(_, millis)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(if unit.is_empty() {
            format!("{text:?} has no unit: {form}")
        } else {
            format!("{text:?} has an unknown unit {unit:?}: {form}")
        });
    };
    let too_long = || {
        format!(
            "{text:?} is too long: at most {} days",
            lockstep::MAX_DURATION.as_secs() / 86_400
        )
    };
    let millis = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(millis))
        .ok_or_else(too_long)?;
    let duration = Duration::from_millis(millis);
    if duration > lockstep::MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

/// A duration as [`parse_duration`] reads it, in the largest unit that
/// keeps it whole.
fn show(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let (name, size) = UNITS
        .iter()
        .rev()
        .find(|(_, size)| millis.is_multiple_of(u128::from(*size)))
        .copied()
        .unwrap_or(("ms", 1));
    format!("{}{name}", millis / u128::from(size))
}

/// A lease: a duration that is not zero.
fn parse_lease(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!(
            "{text:?}: a lease must be longer than zero (a lock that expires at once excludes nobody)"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_parsed() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("8760h"), Ok(lockstep::MAX_DURATION));
    }

    #[test]
    fn bad_durations_say_why() {
        for (text, why) in [
            ("", "is not a duration"),
            ("s", "is not a duration"),
            ("-1s", "is not a duration"),
            ("1.5s", "unknown unit \".5s\""),
            ("30", "has no unit"),
            ("30 s", "unknown unit \" s\""),
            ("30sec", "unknown unit \"sec\""),
            ("8761h", "too long"),
            ("99999999999999999999s", "too long"),
            ("18446744073709551615h", "too long"),
        ] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(why), "{text:?}: {error}");
        }
        assert!(parse_lease("0s").unwrap_err().contains("longer than zero"));
        assert_eq!(parse_lease("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn durations_are_shown_as_they_are_written() {
        for text in ["500ms", "1500ms", "30s", "90s", "2m", "1h"] {
            assert_eq!(show(parse_duration(text).unwrap()), text);
        }
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn statuses_are_reported_as_shells_do() {
        assert_eq!(shell_status(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(shell_status(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(shell_status(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }
}
