//! The command line on PostgreSQL (`--postgres-url`): `check`, `run`,
//! `locks`, `release-all`, the checkout demo with its ledger on a private
//! Redis or in PostgreSQL alone, and `torture` on a PostgreSQL of its own
//! and on the shared one. Each test works in a schema of its own on the
//! test kit's PostgreSQL (`LOCKSTEP_POSTGRES_URL`, else a private server).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `lockstep <args> --postgres-url <shared> --pg-schema <schema>`, the
/// backend flags before a `--` if there is one (what follows it is the
/// command of `run`).
fn lockstep(schema: &str, args: &[&str]) -> Command {
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    c.args(&args[..split])
        .args(["--postgres-url", &lockstep_testkit::shared_postgres_url()])
        .args(["--pg-schema", schema])
        .args(&args[split..])
        .stdin(Stdio::null());
    c
}

fn output(schema: &str, args: &[&str]) -> Output {
    lockstep(schema, args).output().expect("run lockstep")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn schema() -> String {
    format!(
        "cli_{}",
        support::unique_namespace()
            .trim_end_matches(':')
            .replace([':', '-'], "_")
    )
    .to_lowercase()
}

#[test]
fn check_run_locks_and_release_all_work_on_postgres() {
    let schema = schema();
    let _drop = DropSchema(schema.clone());
    let out = output(&schema, &["check"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out).starts_with("ok: acquire + release"),
        "{}",
        text(&out)
    );

    // A run holds its lock while its command waits for a file.
    let dir = std::env::temp_dir().join(&schema);
    std::fs::create_dir_all(&dir).unwrap();
    let gate = dir.join("gate");
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let mut run = lockstep(&schema, &["run", "nightly", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let held: Value = loop {
        let out = output(&schema, &["locks", "list", "--json"]);
        if let Some(line) = text(&out).lines().next() {
            break serde_json::from_str(line).unwrap();
        }
        assert!(Instant::now() < deadline, "the run never took its lock");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(held["key"], "nightly");
    assert!(
        held["metadata"].as_str().unwrap().ends_with("cmd=sh"),
        "{held}"
    );
    // A second run finds it held: the conflict status.
    let out = output(&schema, &["run", "nightly", "--wait", "0s", "--", "true"]);
    assert_eq!(out.status.code(), Some(75), "{out:?}");

    std::fs::write(&gate, "").unwrap();
    assert!(run.wait().unwrap().success());
    let out = output(&schema, &["locks", "show", "nightly"]);
    assert!(text(&out).contains("(free)"), "{}", text(&out));

    // release-all, and tokens that keep growing.
    let token = |o: &Output| -> u64 {
        let line = String::from_utf8_lossy(&o.stdout);
        line.split("fencing token ")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = output(&schema, &["check"]);
    let out = output(&schema, &["release-all"]);
    assert!(text(&out).contains("released 0 lock(s)"), "{}", text(&out));
    let second = output(&schema, &["check"]);
    assert!(token(&second) > token(&first), "tokens grow");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_demo_on_postgres_never_double_charges() {
    let ledger = support::RedisServer::start(&[]);
    let schema = schema();
    let _drop = DropSchema(schema.clone());
    let args = [
        "demo",
        "--ledger-url",
        &ledger.url(),
        "--instances",
        "4",
        "--orders",
        "100",
        "--json",
    ];
    let out = output(&schema, &args);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["provider"], "locking-postgres", "{r}");
    assert_eq!(r["mode"], "processes");
    assert_eq!(r["double_charges"], 0, "{r}");
    assert_eq!(r["uncharged_orders"], 0, "{r}");

    let mut unlocked = args.to_vec();
    unlocked.push("--no-lock");
    let out = output(&schema, &unlocked);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["double_charges"].as_u64().unwrap() > 0,
        "the race shows: {r}"
    );
}

#[test]
fn what_needs_redis_says_so_and_the_bench_measures_postgres() {
    // The bench works in the schema it is given (its own default is
    // lockstep_bench): this test's, dropped after it.
    let own = schema();
    let _drop = DropSchema(own.clone());
    let out = output(&own, &["bench", "--workload", "mem"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("measures w1, w2 and w3"),
        "{out:?}"
    );
    let out = output(
        &own,
        &[
            "bench",
            "--workload",
            "w2",
            "--duration",
            "1",
            "--concurrency",
            "4",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let run: Value = serde_json::from_str(text(&out).lines().next().unwrap()).unwrap();
    let r = &run["results"];
    assert!(r["acq_per_s"].as_f64().unwrap() > 0.0, "{run}");
    assert_eq!(r["violations"], 0.0, "{run}");
    assert!(
        sql(&format!(
            "SELECT nspname FROM pg_namespace WHERE nspname = '{own}'"
        ))
        .contains(&own),
        "the bench did not use the given schema"
    );
}

/// Runs `sql` on the shared server: the first column of each row, as text.
fn sql(query: &str) -> Vec<String> {
    use lockstep::deadpool_postgres::tokio_postgres::{NoTls, SimpleQueryMessage, connect};
    let url = lockstep_testkit::shared_postgres_url();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (client, connection) = connect(&url, NoTls).await.expect("connect");
            let connection = tokio::spawn(connection);
            let rows = client.simple_query(query).await.expect(query);
            drop(client);
            let _ = connection.await;
            rows.into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
                    _ => None,
                })
                .collect()
        })
}

/// Drops `schema` (made by the test's own commands) when the test ends,
/// passed or not.
struct DropSchema(String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        sql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

/// Given only --postgres-url, the demo keeps its ledger in PostgreSQL too
/// (`<schema>.demo_ledger`): 4 processes, no double charge; without locks
/// the race shows; each run deletes its rows, and leaves the table.
#[test]
fn the_demo_on_postgres_alone_keeps_its_ledger_there() {
    let schema = schema();
    let _drop = DropSchema(schema.clone());
    let args = ["demo", "--instances", "4", "--orders", "100", "--json"];
    let out = output(&schema, &args);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["provider"], "locking-postgres", "{r}");
    assert_eq!(r["mode"], "processes");
    assert_eq!(r["instances"], 4);
    assert_eq!(r["charges"], 100, "{r}");
    assert_eq!(r["double_charges"], 0, "{r}");
    assert_eq!(r["uncharged_orders"], 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["declines"].as_u64().unwrap() > 0, "compensation ran: {r}");

    let mut unlocked = args.to_vec();
    unlocked.push("--no-lock");
    let out = output(&schema, &unlocked);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert!(
        r["double_charges"].as_u64().unwrap() > 0,
        "the race shows: {r}"
    );

    let table = format!("{schema}.demo_ledger");
    assert_eq!(
        sql(&format!("SELECT count(*) FROM {table}")),
        ["0"],
        "both runs deleted their rows"
    );
}

/// `torture --spawn-postgres`: the Postgres provider under restarts of its
/// server, paused holders and `pg_terminate_backend`, with no violation.
#[test]
fn a_short_torture_on_postgres_finds_no_violation() {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["torture", "--spawn-postgres", "--duration", "10", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run lockstep");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["provider"], "locking-postgres", "{r}");
    assert_eq!(r["violations"], 0, "{r}");
    assert!(r["operations"].as_u64().unwrap() > 0, "{r}");
    // The schedule is fixed: in 10 s, a restart (at about 2.5 s), cuts and
    // a pause (at about 6 s; faults stop 2 s before the end).
    for kind in ["postgres_restarts", "paused_holders", "dropped_connections"] {
        assert!(r["faults_by_kind"][kind].as_u64() >= Some(1), "{kind}: {r}");
    }
    assert!(r["connections_cut"].as_u64().unwrap() > 0, "{r}");
}

/// `torture --postgres-url`: on a server not its own it restarts nothing,
/// works in a schema it creates, and drops that schema at the end.
#[test]
fn torture_on_a_given_postgres_stays_in_its_own_schema() {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["torture", "--duration", "5", "--json"])
        .args(["--postgres-url", &lockstep_testkit::shared_postgres_url()])
        .stdin(Stdio::null())
        .output()
        .expect("run lockstep");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["violations"], 0, "{r}");
    assert!(r["operations"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["faults_by_kind"].get("postgres_restarts").is_none(),
        "{r}"
    );
    let schema = r["pg_schema"].as_str().unwrap();
    assert!(schema.starts_with("lockstep_torture_"), "{r}");
    assert!(
        sql(&format!(
            "SELECT nspname FROM pg_namespace WHERE nspname = '{schema}'"
        ))
        .is_empty(),
        "{schema} was dropped"
    );
}
