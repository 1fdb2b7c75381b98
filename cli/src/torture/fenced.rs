//! A store that checks fencing tokens: what the lock protects in `hold` and
//! `torture`. It lives in a Redis of its own (a lock service and the data it
//! guards are different systems), in one hash per store.

use redis::aio::MultiplexedConnection;

/// The write, atomic on the store's side.
///
/// ```text
/// KEYS[1]  the store's hash
/// ARGV[1]  the record's name
/// ARGV[2]  the writer's fencing token
/// ARGV[3]  the value
/// ```
/// Returns 1 if written; 0 if a write with a higher token was accepted
/// before (a stale holder), and nothing is written.
const FENCED_WRITE: &str = r"
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':token') or '0')
if tonumber(ARGV[2]) < last then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1] .. ':token', ARGV[2], ARGV[1], ARGV[3])
return 1
";

/// A hash in the store's Redis whose records only accept growing tokens.
#[derive(Clone)]
pub(crate) struct FencedStore {
    conn: MultiplexedConnection,
    hash: String,
    script: std::sync::Arc<redis::Script>,
}

impl FencedStore {
    pub(crate) async fn connect(url: &str, hash: &str) -> Result<FencedStore, redis::RedisError> {
        let conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(FencedStore {
            conn,
            hash: hash.to_owned(),
            script: std::sync::Arc::new(redis::Script::new(FENCED_WRITE)),
        })
    }

    /// Writes `value` to `record` if `token` is not older than the last
    /// accepted one. Returns whether it was accepted.
    pub(crate) async fn write(
        &self,
        record: &str,
        token: u64,
        value: &str,
    ) -> Result<bool, redis::RedisError> {
        let accepted: i64 = self
            .script
            .key(&self.hash)
            .arg(record)
            .arg(token)
            .arg(value)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(accepted == 1)
    }
}
