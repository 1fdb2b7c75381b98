//! `lockstep demo --metrics-addr`: Prometheus text at `GET /metrics` while
//! the demo runs (kept up after it with the hidden `--metrics-linger-ms`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `GET /metrics`: the status line and the body, if it answered.
fn scrape(port: u16) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.to_owned(), body.to_owned()))
}

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_demo_serves_its_metrics() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["demo", "--json", "--orders", "20", "--metrics-addr", &addr])
        .args(["--metrics-linger-ms", "10000"])
        .env_remove("LOCKING_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run lockstep");
    let acquired = r#"lockstep_acquire_seconds_count{provider="in-memory",outcome="acquired"}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    let found = loop {
        if let Some((head, body)) = scrape(port) {
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert!(
                head.contains("Content-Type: text/plain; version=0.0.4"),
                "{head}"
            );
            if value(&body, acquired).is_some_and(|n| n > 0.0) {
                break body;
            }
            last = Some(body);
        }
        assert!(
            Instant::now() < deadline,
            "no {acquired} > 0 in time; last scrape: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found.contains("# TYPE lockstep_acquire_seconds histogram"),
        "{found}"
    );
    assert!(
        found.contains(
            r#"lockstep_acquire_seconds_bucket{provider="in-memory",outcome="acquired",le="+Inf"}"#
        ),
        "{found}"
    );
}
