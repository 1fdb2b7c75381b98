//! `lockstep demo`, run as a user would: the binary, its JSON and its exit
//! statuses, on the in-memory default and on a real redis-server with
//! worker processes.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use serde_json::Value;

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env_remove("LOCKING_REDIS_URL")
        .output()
        .expect("run lockstep")
}

fn json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const FIELDS: [&str; 11] = [
    "provider",
    "instances",
    "orders",
    "attempts",
    "charges",
    "double_charges",
    "lock_timeouts",
    "compensations",
    "lock_wait_p50_us",
    "lock_wait_p99_us",
    "elapsed_ms",
];

/// The default: in-memory, tasks, no setup; every order charged once.
#[test]
fn the_default_demo_charges_every_order_once() {
    let out = lockstep(&["demo", "--json"]);
    let r = json(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    for f in FIELDS {
        assert!(r.get(f).is_some(), "missing {f}: {r}");
    }
    assert_eq!(r["provider"], "in-memory");
    assert_eq!(r["double_charges"], 0);
    assert_eq!(r["charged_orders"], 200);
    assert_eq!(r["attempts"], 600);
    assert!(
        r["compensations"].as_u64().unwrap() > 0,
        "declines are compensated: {r}"
    );
}

/// Four processes, 200 orders, one fresh redis-server: no double charge;
/// and the same without locks: double charges.
#[test]
fn four_processes_on_redis_never_double_charge_and_do_without_locks() {
    let server = support::RedisServer::start(&[]);
    let url = server.url();
    let args = [
        "demo",
        "--redis-url",
        &url,
        "--instances",
        "4",
        "--orders",
        "200",
        "--json",
    ];
    let out = lockstep(&args);
    let r = json(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["provider"], "locking-redis");
    assert_eq!(r["mode"], "processes");
    assert_eq!(r["double_charges"], 0, "{r}");
    assert_eq!(r["uncharged_orders"], 0, "{r}");
    assert_eq!(r["charges"], 200);

    let mut unlocked = args.to_vec();
    unlocked.push("--no-lock");
    let out = lockstep(&unlocked);
    let r = json(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["locking"], false);
    assert!(
        r["double_charges"].as_u64().unwrap() > 0,
        "the race shows without locks: {r}"
    );
}

/// Bad usage and an unreachable Redis: status 2 and a clear message.
#[test]
fn bad_usage_and_unreachable_redis_exit_2() {
    let out = lockstep(&["demo", "--instances", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1"));
    let out = lockstep(&["demo", "--orders", "many"]);
    assert_eq!(out.status.code(), Some(2));
    let port = support::free_port();
    let out = lockstep(&["demo", "--redis-url", &format!("redis://127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = lockstep(&["demo", "--redis-url", "not a url"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The human summary names the outcome.
#[test]
fn the_summary_is_readable() {
    let out = lockstep(&["demo", "--orders", "20"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("every order charged exactly once"),
        "{stdout}"
    );
    let out = lockstep(&["demo", "--orders", "50", "--no-lock", "--charge-ms", "5"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("charged more than once"), "{stdout}");
}

/// `lockstep bench` prints one JSON line per run, with the documented
/// fields, against a redis-server it starts itself. (A smoke test of the
/// harness: the figures themselves are measurements, asserted nowhere.)
#[test]
fn bench_prints_one_json_line_per_run() {
    for (workload, fields) in [
        (
            "w1",
            &[
                "pairs_per_s",
                "acquire_us",
                "client_cmds_per_op",
                "redis_cmds_per_op",
            ][..],
        ),
        (
            "w2",
            &[
                "acq_per_s",
                "wait_us",
                "timeouts",
                "violations",
                "fairness",
                "client_cmds_per_op",
            ][..],
        ),
        (
            "w3",
            &[
                "acq_per_s",
                "wait_us",
                "timeouts",
                "violations",
                "redis_cmds_per_op",
            ][..],
        ),
    ] {
        let out = lockstep(&[
            "bench",
            "--workload",
            workload,
            "--spawn-redis",
            "--duration",
            "0.3",
            "--runs",
            "2",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        assert_eq!(lines.len(), 3, "two runs and their medians: {stdout}");
        for line in &lines[..2] {
            assert_eq!(line["workload"], workload);
            for f in fields {
                assert!(
                    line["results"].get(*f).is_some(),
                    "{workload} lacks {f}: {line}"
                );
            }
            assert_eq!(line["results"]["violations"].as_u64().unwrap_or(0), 0);
        }
        assert_eq!(lines[2]["median_of"], 2);
    }
}

/// bench refuses to flush a database that holds data unless told to.
#[test]
fn bench_does_not_flush_a_database_silently() {
    let server = support::RedisServer::start(&[]);
    let mut c = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("precious")
        .arg("1")
        .query(&mut c)
        .unwrap();
    let out = lockstep(&[
        "bench",
        "--workload",
        "w1",
        "--redis-url",
        &server.url(),
        "--duration",
        "0.2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--flush"));
    let kept: Option<String> = redis::cmd("GET").arg("precious").query(&mut c).unwrap();
    assert_eq!(kept.as_deref(), Some("1"));
    // --flush on database 2 flushes database 2 only: the URL's database
    // is kept for every connection bench makes.
    let out = lockstep(&[
        "bench",
        "--workload",
        "w1",
        "--redis-url",
        &format!("{}/2", server.url()),
        "--flush",
        "--duration",
        "0.2",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept: Option<String> = redis::cmd("GET").arg("precious").query(&mut c).unwrap();
    assert_eq!(kept.as_deref(), Some("1"), "database 0 untouched");
    let used: u64 = redis::cmd("DBSIZE")
        .query(
            &mut redis::Client::open(format!("{}/2", server.url()))
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap();
    assert!(used > 0, "the bench ran in database 2");
}

/// `lockstep torture` injects faults and reports, as one JSON object, no
/// violation. (CI runs a longer one; see `.ci/run`.)
#[test]
fn a_short_torture_run_injects_faults_and_finds_no_violation() {
    let out = lockstep(&["torture", "--duration", "6", "--json"]);
    let r = json(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    for f in [
        "operations",
        "violations",
        "lost_leases",
        "errors",
        "faults_injected",
        "elapsed_ms",
    ] {
        assert!(r.get(f).is_some(), "missing {f}: {r}");
    }
    assert_eq!(r["violations"], 0, "{r}");
    assert!(r["faults_injected"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["operations"].as_u64().unwrap() > 0, "{r}");
}
