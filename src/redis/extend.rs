//! Extending leases: owner-checked, all locks or none (`lua/extend.lua`).

use std::time::Duration;

use super::RedisProvider;
use super::scripts::EXTEND;
use super::scripts::extend::ExtendArgs;
use super::wire::millis_ceil;
use crate::error::LockError;

impl RedisProvider {
    /// [`LockingProvider::extend`](crate::provider::LockingProvider::extend).
    pub(super) async fn extend_inner(
        &self,
        keys: &[String],
        owner: Option<&str>,
        lease: Duration,
    ) -> Result<(), LockError> {
        self.inner.conns.check_open()?;
        let lock_keys = self.lock_keys(keys);
        match self
            .run_extend(&lock_keys, owner, millis_ceil(lease), true)
            .await?
        {
            None => Ok(()),
            Some(i) => Err(LockError::NotOwner {
                key: keys[i].clone(),
            }),
        }
    }

    /// `extend.lua` on one server: `None` when every lock was extended,
    /// else the position of the first not held by `owner`.
    pub(super) async fn extend_single(
        &self,
        lock_keys: &[String],
        owner: Option<&str>,
        ttl_ms: u64,
        indexed: bool,
    ) -> Result<Option<usize>, LockError> {
        let index = owner
            .filter(|_| indexed)
            .map(|o| self.inner.layout.owner_index(o));
        self.extend_script(&ExtendArgs {
            lock_keys,
            index: index.as_ref(),
            owner: owner.unwrap_or(""),
            ttl_ms,
        })
        .await
    }

    /// One run of `extend.lua` (all keys in one slot on a cluster).
    pub(super) async fn extend_script(
        &self,
        args: &ExtendArgs<'_>,
    ) -> Result<Option<usize>, LockError> {
        let reply = self
            .inner
            .conns
            .eval("extend", &EXTEND, &args.keys(), &args.argv())
            .await?;
        args.decode(reply)
    }
}
