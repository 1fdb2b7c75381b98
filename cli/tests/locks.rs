//! `lockstep locks list | show | force-release` against a private
//! redis-server: the table and the JSON lines show who holds what, and a
//! force-release frees a lock whose holder then finds out.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lockstep::{
    AcquireOptions, ExtendOptions, InspectOptions, LockingModule, RedisConfig, RedisProvider,
};
use support::RedisServer;

const NS: &str = "locks-cli:";

fn lockstep(server: &RedisServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .args(["--redis-url", &server.url(), "--namespace", NS])
        .stdin(Stdio::null())
        .output()
        .expect("run lockstep")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn module(server: &RedisServer) -> LockingModule {
    let p = RedisProvider::connect(RedisConfig::from_url(server.url()).namespace(NS))
        .await
        .unwrap();
    support::module_with(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_list_and_show_tell_who_holds_what() {
    let server = RedisServer::start(&[]);
    let m = module(&server).await;
    // The older lock has the later name: the table's order is by age.
    let a = m
        .acquire(
            "jobs/z",
            AcquireOptions::new().owner_id("o1").metadata("nightly"),
        )
        .await
        .unwrap();
    let taken = m.inspect("jobs/z", InspectOptions::new()).await.unwrap()[0]
        .holder()
        .unwrap()
        .acquired_at;
    // Times are in the server's milliseconds: the next lock in a later one.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::SystemTime::now() <= taken + Duration::from_millis(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stood still"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let b = m
        .acquire(
            "jobs/b",
            AcquireOptions::new().expire(Duration::from_secs(60)),
        )
        .await
        .unwrap();

    let out = lockstep(&server, &["locks", "list"]);
    assert!(out.status.success(), "{out:?}");
    let table = text(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("KEY") && lines[0].contains("LEASE LEFT"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("jobs/z") && lines[1].contains("o1"),
        "oldest first: {table}"
    );
    assert!(lines[1].contains(&a.fencing_token().to_string()) && lines[1].ends_with("nightly"));
    assert!(
        lines[2].starts_with("jobs/b") && lines[2].contains("(anonymous)"),
        "{table}"
    );

    let out = lockstep(&server, &["locks", "list", "--json", "--owner", "o1"]);
    let json: Vec<serde_json::Value> = text(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["key"], "jobs/z");
    assert_eq!(json[0]["state"], "held");
    assert_eq!(json[0]["fencing_token"], a.fencing_token());
    assert_eq!(json[0]["lease_left_ms"], serde_json::Value::Null);
    assert_eq!(json[0]["metadata"], "nightly");

    let out = lockstep(&server, &["locks", "list", "--json", "--prefix", "jobs/b"]);
    let one: serde_json::Value = serde_json::from_str(text(&out).trim()).unwrap();
    assert_eq!(one["owner"], serde_json::Value::Null);
    assert!(one["lease_left_ms"].as_u64().unwrap() > 50_000, "{one}");

    let out = lockstep(&server, &["locks", "show", "jobs/b", "nothing"]);
    let shown = text(&out);
    assert!(
        shown.contains("(free)") && shown.contains("jobs/b"),
        "{shown}"
    );

    assert!(a.release().await.unwrap() && b.release().await.unwrap());
    let out = lockstep(&server, &["locks", "list"]);
    assert!(text(&out).contains("(no locks)"), "{}", text(&out));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_release_needs_yes_off_a_terminal_and_fences_the_old_holder() {
    let server = RedisServer::start(&[]);
    let m = module(&server).await;
    let old = m
        .acquire(
            "stuck",
            AcquireOptions::new()
                .owner_id("gone")
                .expire(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let out = lockstep(&server, &["locks", "force-release", "stuck"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(
        m.acquire("stuck", AcquireOptions::new()).await.is_err(),
        "still held"
    );

    let out = lockstep(
        &server,
        &["locks", "force-release", "stuck", "free", "--yes"],
    );
    assert!(out.status.success(), "{out:?}");
    let said = text(&out);
    assert!(said.contains("freed \"stuck\": owner gone"), "{said}");
    assert!(said.contains("\"free\" was not held"), "{said}");
    let e = m
        .extend(
            "stuck",
            ExtendOptions::new(Duration::from_secs(60)).owner_id("gone"),
        )
        .await
        .unwrap_err();
    assert!(e.is_lost(), "{e:?}");
    let next = m.acquire("stuck", AcquireOptions::new()).await.unwrap();
    assert!(next.fencing_token() > old.fencing_token());
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_shows_its_host_pid_and_command() {
    let server = RedisServer::start(&[]);
    let gate = server.dir.join("gate");
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let mut run = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "run",
            "nightly",
            "--redis-url",
            &server.url(),
            "--namespace",
            NS,
        ])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let json = loop {
        let out = lockstep(&server, &["locks", "list", "--json"]);
        if let Some(line) = text(&out).lines().next() {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let meta = json["metadata"].as_str().unwrap().to_owned();
    assert!(
        meta.starts_with("host=")
            && meta.contains(&format!("pid={}", run.id()))
            && meta.ends_with(" cmd=sh"),
        "{meta}"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(run.wait().unwrap().success());

    // A label of the caller's instead; control characters are refused.
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "run",
            "nightly",
            "--label",
            "deploy #42",
            "--redis-url",
            &server.url(),
        ])
        .args(["--namespace", NS, "--", "sh", "-c", "exit 0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "run",
            "nightly",
            "--label",
            "a\nb",
            "--redis-url",
            &server.url(),
        ])
        .args(["--namespace", NS, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("control character"));
}
