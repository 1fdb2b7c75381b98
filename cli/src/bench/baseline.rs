//! `--baseline`: a bare Redis lock, measured beside lockstep in the same
//! run, against the same server, with the same client shape (the same
//! workers, one multiplexed connection, the same key names). It is what
//! rslock and most hand-written locks do, and nothing more:
//!
//! - one key: `SET key token NX PX ttl` to acquire, a compare-and-delete
//!   script (`GET` == token, then `DEL`) to release; a held lock is tried
//!   again after [`RETRY`];
//! - several keys (W3): one script that checks every key is free and
//!   `SET`s them all with `PX` (node-redlock's shape), and one that deletes
//!   those still holding the token.
//!
//! No fencing tokens, no fairness, no re-entry, no owner index, no undo of
//! an unanswered acquisition: the price of each is what `vs_bare` shows.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Script};
use tokio::time::Instant;

/// How long a bare waiter sleeps before trying a held lock again.
pub(super) const RETRY: Duration = Duration::from_millis(1);

/// Releases a key still holding the token.
static RELEASE_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});

/// Takes every key, or none, with a lease.
static ACQUIRE_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "for i = 1, #KEYS do if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end end \
         for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2]) end return 1",
    )
});

/// Releases the keys still holding the token.
static RELEASE_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local n = 0 for i = 1, #KEYS do if redis.call('GET', KEYS[i]) == ARGV[1] then \
         n = n + redis.call('DEL', KEYS[i]) end end return n",
    )
});

/// The bare lock of one bench run.
#[derive(Clone)]
pub(super) struct BareLock {
    conn: MultiplexedConnection,
    ttl_ms: u64,
    wait: Duration,
}

/// Why a bare acquisition failed.
pub(super) enum BareError {
    TimedOut,
    Redis,
}

impl BareLock {
    /// The bare lock on `conn`, with lockstep's key names (`bench:{key}`).
    pub(super) fn new(conn: MultiplexedConnection, ttl_ms: u64, wait: Duration) -> BareLock {
        BareLock { conn, ttl_ms, wait }
    }

    fn names(keys: &[String]) -> Vec<String> {
        keys.iter().map(|k| format!("bench:{{{k}}}")).collect()
    }

    /// Takes `keys` with `token`, retrying until the wait is over.
    pub(super) async fn acquire(&self, keys: &[String], token: &str) -> Result<(), BareError> {
        let names = Self::names(keys);
        let deadline = Instant::now() + self.wait;
        let mut conn = self.conn.clone();
        loop {
            let taken = if let [name] = names.as_slice() {
                let set: Option<String> = redis::cmd("SET")
                    .arg(name)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms)
                    .query_async(&mut conn)
                    .await
                    .map_err(|_| BareError::Redis)?;
                set.is_some()
            } else {
                let mut invocation = ACQUIRE_ALL.prepare_invoke();
                for n in &names {
                    invocation.key(n);
                }
                let taken: i64 = invocation
                    .arg(token)
                    .arg(self.ttl_ms)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|_| BareError::Redis)?;
                taken == 1
            };
            if taken {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BareError::TimedOut);
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Releases what `token` still holds among `keys`.
    pub(super) async fn release(&self, keys: &[String], token: &str) -> bool {
        let names = Self::names(keys);
        let mut conn = self.conn.clone();
        let script = if names.len() == 1 {
            &RELEASE_ONE
        } else {
            &RELEASE_ALL
        };
        let mut invocation = script.prepare_invoke();
        for n in &names {
            invocation.key(n);
        }
        let released: Result<i64, _> = invocation.arg(token).invoke_async(&mut conn).await;
        released.is_ok_and(|n| n as usize == names.len())
    }

    /// Loads the scripts and checks the connection.
    pub(super) async fn warm_up(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        for s in [&*RELEASE_ONE, &*ACQUIRE_ALL, &*RELEASE_ALL] {
            s.prepare_invoke().load_async(&mut conn).await?;
        }
        let _: () = conn.del("bench:{warm-up}").await?;
        Ok(())
    }
}
