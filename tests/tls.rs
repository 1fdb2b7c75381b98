//! `rediss://` against a redis-server listening with TLS, with a private CA
//! and server certificate that the test generates (openssl).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lockstep::{AcquireOptions, ConfigError, RedisConfig, RedisProvider};
use support::{RedisServer, free_port, module_with};

/// A CA and a server certificate for localhost/127.0.0.1, in `dir`.
fn certificates(dir: &Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (the TLS test generates its certificates with it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let subject = format!("/CN={ca_name}");
    run(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", &subject,
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A server with TLS on `tls_port` (and its plain port, for the readiness check).
fn tls_server(cert: &Path, key: &Path, ca: &Path, tls_port: u16) -> RedisServer {
    let tls_port = tls_port.to_string();
    RedisServer::start(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_work_over_tls_with_a_private_ca() {
    let dir = temp_dir("ok");
    let (ca, cert, key) = certificates(&dir, "lockstep test CA");
    let tls_port = free_port();
    let _server = tls_server(&cert, &key, &ca, tls_port);
    let config = RedisConfig::from_url(format!("rediss://localhost:{tls_port}"))
        .namespace("tls:")
        .tls_root_cert(&ca);
    let provider = RedisProvider::connect(config)
        .await
        .expect("connect over TLS");
    assert!(provider.is_notified(), "the subscription runs over TLS too");
    let m = module_with(provider);
    let lease = m
        .acquire(
            "k",
            AcquireOptions::new()
                .owner_id("u")
                .expire(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert!(lease.fencing_token() > 0);
    assert!(lease.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_certificate_is_a_clear_startup_error() {
    let dir = temp_dir("bad");
    let (_, cert, key) = certificates(&dir, "the server's CA");
    let other = temp_dir("other");
    let (other_ca, _, _) = certificates(&other, "another CA");
    let tls_port = free_port();
    let _server = tls_server(&cert, &key, &dir.join("ca.crt"), tls_port);
    let config = RedisConfig::from_url(format!("rediss://localhost:{tls_port}"))
        .tls_root_cert(&other_ca)
        .connect_timeout(Duration::from_secs(2));
    let e = RedisProvider::connect(config).await.unwrap_err();
    assert!(matches!(e, ConfigError::Unreachable { .. }), "{e:?}");
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("tls") || text.contains("issuer"),
        "{e}"
    );
}

#[tokio::test]
async fn a_missing_root_certificate_file_is_a_typed_error() {
    // Unreadable with rediss://, and pointless without TLS.
    for url in ["rediss://localhost:1", "redis://localhost:1"] {
        let config = RedisConfig::from_url(url).tls_root_cert("/nonexistent/ca.pem");
        let e = RedisProvider::connect(config).await.unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::InvalidSetting {
                    name: "tls_root_cert",
                    ..
                }
            ),
            "{url}: {e:?}"
        );
    }
}
