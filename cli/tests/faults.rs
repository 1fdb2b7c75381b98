//! Fault injection with real processes: lock holders killed or paused,
//! Redis killed, paused or cut off by a proxy while calls are in flight.
//! Every server and holder here is a private process started by the test.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use lockstep::{
    AcquireOptions, ExecuteOptions, ExtendOptions, LockError, RedisConfig, RedisProvider,
    ReleaseOptions,
};
use redis::AsyncCommands;
use support::{Proxy, RedisServer, eventually, module_with, raw_connection};
use tokio::time::{Instant, timeout};

const NS: &str = "faults:";

fn owner(o: &str) -> AcquireOptions {
    AcquireOptions::new().owner_id(o)
}

/// A `lockstep hold` process and its output, line by line.
struct Holder {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Holder {
    fn start(redis_url: &str, extra: &[&str]) -> Holder {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args([
                "hold",
                "--redis-url",
                redis_url,
                "--namespace",
                NS,
                "--key",
                "k",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lockstep hold");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Holder { child, lines }
    }

    /// The next line of output (blocking; the holder prints promptly).
    fn line(&mut self) -> String {
        self.lines
            .next()
            .expect("the holder printed a line")
            .expect("UTF-8")
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(url: String) -> RedisConfig {
    RedisConfig::from_url(url)
        .namespace(NS)
        .wait_fallback(Duration::from_secs(60))
}

/// A holder killed with -9 never releases: its lock is free again when its
/// lease runs out (within 100 ms of it), and a waiter, woken by that expiry
/// rather than by polling, gets it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_frees_its_lock_when_its_lease_runs_out() {
    let server = RedisServer::start(&[]);
    let mut holder = Holder::start(&server.url(), &["--lease-ms", "1000"]);
    assert!(holder.line().starts_with("held "));
    let waiter = module_with(RedisProvider::connect(config(server.url())).await.unwrap());
    let mut c = raw_connection(&server.url()).await;
    let pttl: i64 = c.pttl(format!("{NS}{{k}}")).await.unwrap();
    let expires_at = Instant::now() + Duration::from_millis(pttl as u64);
    holder.signal("KILL");
    let lease = waiter
        .acquire("k", owner("waiter").timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    let got_it = Instant::now();
    assert!(
        got_it >= expires_at - Duration::from_millis(20),
        "not before the lease ran out"
    );
    assert!(
        got_it <= expires_at + Duration::from_millis(100),
        "{:?} after the lease ran out",
        got_it - expires_at
    );
    assert!(lease.release().await.unwrap());
}

/// A holder paused (SIGSTOP) past its lease: someone else takes the lock
/// with a newer token and writes; when the holder resumes, its late write
/// is refused by the fenced store, its renewal reports the loss, the job's
/// signal fires, and execute fails with `Lost the lock`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_loses_its_lease_and_its_late_write_is_refused() {
    let locks = RedisServer::start(&[]);
    let store = RedisServer::start(&[]);
    let mut holder = Holder::start(
        &locks.url(),
        &[
            "--lease-ms",
            "600",
            "--renew",
            "--store-url",
            &store.url(),
            "--write-every-ms",
            "50",
        ],
    );
    let old: u64 = holder
        .line()
        .strip_prefix("held ")
        .unwrap()
        .parse()
        .unwrap();
    // Pause it right after a write, while it sleeps before the next one.
    assert_eq!(holder.line(), format!("write {old} accepted"));
    holder.signal("STOP");
    let successor = module_with(RedisProvider::connect(config(locks.url())).await.unwrap());
    let lease = successor
        .acquire("k", owner("successor").timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    let new = lease.fencing_token();
    assert!(new > old);
    let mut s = raw_connection(&store.url()).await;
    // The successor's write, with its newer token (the store's rule is
    // "never below the highest token seen").
    let _: () = s
        .hset_multiple(
            "fenced",
            &[("k:token", new.to_string()), ("k", "successor".to_owned())],
        )
        .await
        .unwrap();
    holder.signal("CONT");
    let mut rest = Vec::new();
    loop {
        let line = holder.line();
        let done = line.starts_with("execute: ");
        rest.push(line);
        if done {
            break;
        }
    }
    assert!(rest.contains(&format!("write {old} rejected")), "{rest:?}");
    assert!(!rest.contains(&format!("write {old} accepted")), "{rest:?}");
    assert!(rest.contains(&"lost".to_owned()), "{rest:?}");
    assert_eq!(rest.last().unwrap(), "execute: Lost the lock for key(s) k");
    assert_eq!(holder.child.wait().unwrap().code(), Some(1));
    let token: String = s.hget("fenced", "k:token").await.unwrap();
    assert_eq!(
        token,
        new.to_string(),
        "the store kept the newer holder's token"
    );
    assert!(
        lease.release().await.unwrap(),
        "the successor still holds the lock"
    );
}

/// A waiter keeps waiting through a Redis restart (which loses the lock:
/// there is no persistence) and gets the lock soon after, on the same
/// provider: its subscription reconnects and it tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_recovers_when_redis_restarts_while_it_waits() {
    let mut server = RedisServer::start(&[]);
    let config = || {
        config(server.url())
            .connect_timeout(Duration::from_millis(300))
            .response_timeout(Duration::from_millis(300))
    };
    let holder = module_with(RedisProvider::connect(config()).await.unwrap());
    let waiter_provider = RedisProvider::connect(config()).await.unwrap();
    let waiter = module_with(waiter_provider.clone());
    holder.acquire("k", owner("h")).await.unwrap();
    let waiting = tokio::spawn(async move {
        waiter
            .acquire("k", owner("w").timeout(Duration::from_secs(20)))
            .await
    });
    // The waiter is queued in Redis before the restart wipes everything.
    let c = raw_connection(&server.url()).await;
    eventually(Duration::from_secs(5), "the waiter queued", || {
        let mut c = c.clone();
        async move { c.llen::<_, u64>(format!("{NS}{{k}}:q")).await.unwrap_or(0) > 0 }
    })
    .await;
    server.restart();
    let restarted = Instant::now();
    let lease = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap();
    assert_eq!(lease.owner_id(), Some("w"));
    println!("acquired {:?} after the restart", restarted.elapsed());
    eventually(Duration::from_secs(5), "resubscribed", || async {
        waiter_provider.is_notified()
    })
    .await;
}

/// While Redis is paused, release and extend fail with typed "outcome
/// unknown" errors within the response timeout, and work again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_extend_time_out_on_a_paused_redis() {
    let server = RedisServer::start(&[]);
    let config = config(server.url()).response_timeout(Duration::from_millis(200));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    m.acquire("k", owner("u").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    server.signal("STOP");
    eprintln!("DEBUG stopped");
    for result in [
        m.release("k", ReleaseOptions::new().owner_id("u"))
            .await
            .map(|_| ()),
        m.extend(
            "k",
            ExtendOptions::new(Duration::from_secs(30)).owner_id("u"),
        )
        .await,
    ] {
        let e = result.unwrap_err();
        assert!(e.is_backend(), "{e:?}");
    }
    server.signal("CONT");
    // The release was sent before the timeout: it runs once Redis resumes
    // (its outcome was unknown, not negative). Either way calls work again.
    eventually(Duration::from_secs(5), "calls work again", || async {
        m.acquire("k", owner("u").expire(Duration::from_secs(30)))
            .await
            .is_ok()
    })
    .await;
}

/// A partition that swallows the reply of an acquisition whose script ran:
/// the caller gets "outcome unknown", and the lock is undone anyway (the
/// undo's requests still get through): no ghost lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_in_a_partition_leaves_no_ghost_lock() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(server.port);
    let config = config(proxy.url()).response_timeout(Duration::from_millis(300));
    let p = RedisProvider::connect(config).await.unwrap();
    let m = module_with(p.clone());
    proxy.drop_replies(true);
    let e = m
        .acquire("ghost", owner("u").expire(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(e.is_outcome_unknown(), "{e:?}");
    let c = raw_connection(&server.url()).await;
    let exists = |c: &redis::aio::MultiplexedConnection| {
        let (mut c, key) = (c.clone(), p.lock_key("ghost"));
        async move { c.exists::<_, bool>(key).await.unwrap() }
    };
    // The script did run: the lock is there, though its owner was told the
    // outcome is unknown. Nothing can reach Redis and come back while the
    // replies are lost; once they flow again, the undo removes it.
    assert!(exists(&c).await, "the acquisition ran on the server");
    proxy.drop_replies(false);
    eventually(
        Duration::from_secs(10),
        "the ghost lock is undone",
        || async { !exists(&c).await },
    )
    .await;
    m.acquire("ghost", owner("v")).await.unwrap();
}

/// A full partition: acquire, release and extend each fail with a typed
/// error within their timeouts, nothing hangs, and the same provider works
/// again once the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_within_their_timeouts_during_a_partition() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(server.port);
    let config = config(proxy.url())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    m.acquire("held", owner("u").expire(Duration::from_secs(30)))
        .await
        .unwrap();
    proxy.partition(true);
    let bound = Duration::from_millis(300 + 300 + 500);
    for _ in 0..2 {
        let started = Instant::now();
        let e = m.acquire("k", owner("u")).await.unwrap_err();
        assert!(e.is_backend(), "{e:?}");
        assert!(started.elapsed() < bound, "{:?}", started.elapsed());
        let started = Instant::now();
        assert!(
            m.release("held", ReleaseOptions::new().owner_id("u"))
                .await
                .is_err()
        );
        assert!(
            m.extend(
                "held",
                ExtendOptions::new(Duration::from_secs(30)).owner_id("u")
            )
            .await
            .is_err()
        );
        assert!(started.elapsed() < 2 * bound, "{:?}", started.elapsed());
    }
    proxy.partition(false);
    proxy.cut();
    eventually(
        Duration::from_secs(5),
        "the provider works again",
        || async { m.acquire("k", owner("u")).await.is_ok() },
    )
    .await;
}

/// A partition during `execute`: renewals cannot get through, so the job's
/// signal fires before the lease can have run out in Redis, and execute
/// reports the loss; the lock expires in Redis on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_during_execute_is_reported_as_a_lost_lease() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(server.port);
    let config = config(proxy.url())
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200));
    let m = module_with(RedisProvider::connect(config).await.unwrap());
    let started = Instant::now();
    let r = m
        .execute(
            "k",
            ExecuteOptions::new().expire(Duration::from_millis(900)),
            |held| {
                let proxy = &proxy;
                async move {
                    proxy.partition(true);
                    timeout(Duration::from_secs(5), held.cancelled())
                        .await
                        .expect("the signal fires");
                    held.fencing_token()
                }
            },
        )
        .await;
    let signalled = started.elapsed();
    assert!(matches!(r, Err(LockError::LeaseLost { .. })), "{r:?}");
    assert!(
        signalled < Duration::from_millis(900 + 500),
        "{signalled:?}"
    );
    proxy.partition(false);
    let mut c = raw_connection(&server.url()).await;
    eventually(Duration::from_secs(5), "the lock expired in Redis", || {
        let mut c = c.clone();
        async move { !c.exists::<_, bool>(format!("{NS}{{k}}")).await.unwrap() }
    })
    .await;
    let _: () = c.ping().await.unwrap();
}

/// Latency slows calls down but breaks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_slows_calls_without_breaking_them() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(server.port);
    let m = module_with(RedisProvider::connect(config(proxy.url())).await.unwrap());
    proxy.set_latency(Duration::from_millis(40));
    let started = Instant::now();
    let lease = m
        .acquire("k", owner("u").expire(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(80),
        "{:?}",
        started.elapsed()
    );
    let mut lease = lease;
    lease.extend(Duration::from_secs(5)).await.unwrap();
    assert!(lease.release().await.unwrap());
}
