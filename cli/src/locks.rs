//! `lockstep locks list | show | force-release`: who holds which lock, and
//! the operator's way to free one whose holder is gone or stuck.

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, UNIX_EPOCH};

use clap::Subcommand;
use lockstep::{InspectOptions, ListOptions, LockInfo, LockState};
use serde_json::json;

use crate::backend::BackendArgs;
use crate::failure::{CommandResult, EXIT_OK, EXIT_WRONG, Failure};

/// The arguments of `lockstep locks`.
#[derive(Debug, clap::Args)]
pub(crate) struct LocksArgs {
    #[command(subcommand)]
    command: LocksCommand,
}

#[derive(Debug, Subcommand)]
enum LocksCommand {
    /// The held locks, oldest first: key, owner, fencing token, how long
    /// held, lease left, processes waiting, holder metadata. Scans the
    /// namespace in pages (SCAN, never KEYS), on every master of a cluster.
    List {
        /// Only keys that start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only locks of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// These locks, held or free.
    Show {
        /// The lock keys.
        #[arg(required = true)]
        keys: Vec<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Free these locks whoever holds them. The old holder finds out: its
    /// next renewal or extend fails as a lost lease, and the next holder's
    /// fencing token is higher. Asks first on a terminal; elsewhere it
    /// needs --yes. Exit status 1 when not confirmed.
    ForceRelease {
        /// The lock keys.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
}

/// Runs `lockstep locks ...`.
pub(crate) async fn locks(args: LocksArgs) -> CommandResult {
    match args.command {
        LocksCommand::List {
            prefix,
            owner,
            json,
            backend,
        } => {
            let module = backend.connect().await.map_err(Failure::usage)?.module;
            let mut options = ListOptions::new().prefix(prefix);
            if let Some(o) = owner {
                options = options.owner_id(o);
            }
            let found = module.locks(options).await;
            module.shutdown().await;
            print(&found?, json);
            Ok(EXIT_OK)
        }
        LocksCommand::Show {
            keys,
            json,
            backend,
        } => {
            let module = backend.connect().await.map_err(Failure::usage)?.module;
            let found = module.inspect(keys, InspectOptions::new()).await;
            module.shutdown().await;
            print(&found?, json);
            Ok(EXIT_OK)
        }
        LocksCommand::ForceRelease { keys, yes, backend } => {
            let module = backend.connect().await.map_err(Failure::usage)?.module;
            let result = force_release(&module, keys, yes).await;
            module.shutdown().await;
            result
        }
    }
}

async fn force_release(
    module: &lockstep::LockingModule,
    keys: Vec<String>,
    yes: bool,
) -> CommandResult {
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::usage(
                "force-release frees locks others hold: give --yes when not on a terminal",
            ));
        }
        print(
            &module.inspect(keys.clone(), InspectOptions::new()).await?,
            false,
        );
        eprint!("Free {} lock(s) whoever holds them? [y/N] ", keys.len());
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("lockstep: nothing freed");
            return Ok(EXIT_WRONG);
        }
    }
    let freed = module
        .force_release(keys.clone(), InspectOptions::new())
        .await?;
    for (key, info) in keys.iter().zip(&freed) {
        match info.as_ref().and_then(|i| i.holder()) {
            Some(h) => println!(
                "freed {key:?}: owner {}, fencing token {}, held for {}",
                h.owner.as_deref().unwrap_or("(anonymous)"),
                h.fencing_token,
                human(h.held_for)
            ),
            None => println!("{key:?} was not held"),
        }
    }
    Ok(EXIT_OK)
}

/// Prints locks as a table, or as JSON lines.
fn print(locks: &[LockInfo], json: bool) {
    if json {
        for l in locks {
            println!("{}", to_json(l));
        }
        return;
    }
    let rows: Vec<[String; 7]> = locks.iter().map(row).collect();
    let header = [
        "KEY",
        "OWNER",
        "TOKEN",
        "HELD FOR",
        "LEASE LEFT",
        "WAITING",
        "METADATA",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
    if rows.is_empty() {
        println!("(no locks)");
    }
}

fn row(l: &LockInfo) -> [String; 7] {
    let waiting = l.waiting.to_string();
    match &l.state {
        LockState::Held(h) => [
            l.key.clone(),
            h.owner.clone().unwrap_or_else(|| "(anonymous)".into()),
            h.fencing_token.to_string(),
            human(h.held_for),
            h.lease_left.map_or_else(|| "none".into(), human),
            waiting,
            h.metadata.clone().unwrap_or_default(),
        ],
        LockState::Reserved { lease_left } => [
            l.key.clone(),
            "(reserved for a waiter)".into(),
            "-".into(),
            "-".into(),
            lease_left.map_or_else(|| "none".into(), human),
            waiting,
            String::new(),
        ],
        _ => [
            l.key.clone(),
            "(free)".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            waiting,
            String::new(),
        ],
    }
}

fn to_json(l: &LockInfo) -> serde_json::Value {
    let ms = |d: Duration| d.as_millis() as u64;
    match &l.state {
        LockState::Held(h) => json!({
            "key": l.key,
            "state": "held",
            "owner": h.owner,
            "fencing_token": h.fencing_token,
            "acquired_at_ms": h.acquired_at.duration_since(UNIX_EPOCH).map_or(0, ms),
            "held_for_ms": ms(h.held_for),
            "lease_left_ms": h.lease_left.map(ms),
            "waiting": l.waiting,
            "metadata": h.metadata,
        }),
        LockState::Reserved { lease_left } => json!({
            "key": l.key,
            "state": "reserved",
            "lease_left_ms": lease_left.map(ms),
            "waiting": l.waiting,
        }),
        _ => json!({ "key": l.key, "state": "free", "waiting": l.waiting }),
    }
}

/// 450ms, 12.3s, 4m05s, 2h10m, 3d04h.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human(Duration::from_millis(450)), "450ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(7_800)), "2h10m");
        assert_eq!(human(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d04h");
    }
}
