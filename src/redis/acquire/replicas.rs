//! Replica acknowledgement on one server: `acquire.lua`, then `WAIT` on
//! the same connection; an acquisition the replicas did not all
//! acknowledge is released again. (A cluster pipelines the two instead;
//! see `cluster/mod.rs`.)

use redis::Value;

use crate::error::LockError;
use crate::redis::RedisProvider;
use crate::redis::error::not_replicated;
use crate::redis::keyset::Keyset;
use crate::redis::scripts::acquire::{AcquireArgs, AcquireReply};
use crate::redis::scripts::{self, ACQUIRE, Arg};

impl RedisProvider {
    /// See the module docs. `argv` is `args` in the script's order.
    pub(super) async fn acquire_replicated(
        &self,
        keys: &Keyset,
        argv: &[Arg<'_>],
        args: &AcquireArgs<'_>,
    ) -> Result<Value, LockError> {
        let (required, wait) = self.inner.replicas;
        let limit = self.inner.response_timeout + wait;
        let (reply, acked) = self
            .inner
            .conns
            .run_exclusive("acquire", limit, |mut conn| async move {
                let functions = &self.inner.conns.functions;
                let reply =
                    scripts::invoke(&mut conn, &ACQUIRE, &keys.keys, argv, functions).await?;
                if !AcquireReply::is_granted(&reply) {
                    return Ok((reply, None));
                }
                let acked: i64 = redis::cmd("WAIT")
                    .arg(required)
                    .arg(wait.as_millis() as u64)
                    .query_async(&mut conn)
                    .await?;
                Ok((reply, Some(acked)))
            })
            .await?;
        match acked {
            Some(acked) if (acked as usize) < required => {
                // Not durable enough: give back what this acquisition took.
                let locks = keys.locks();
                if let Err(e) = self.release_by_nonce(locks, args.owner, args.nonce).await {
                    let expire =
                        (args.ttl_ms > 0).then(|| std::time::Duration::from_millis(args.ttl_ms));
                    self.undo_later(
                        locks.to_vec(),
                        args.owner.to_owned(),
                        args.nonce.to_owned(),
                        expire,
                    );
                    tracing::debug!(
                        "releasing an unreplicated acquisition failed, retrying in the background: {e}"
                    );
                }
                Err(not_replicated(acked, required, wait))
            }
            _ => Ok(reply),
        }
    }
}
