//! Releasing every lock of an owner (through its index), or of the
//! namespace (`lua/release_all.lua`).

use super::RedisProvider;
use super::scripts::RELEASE_ALL;
use super::scripts::release_all::ReleaseAllArgs;
use crate::error::LockError;

impl RedisProvider {
    /// [`LockingProvider::release_all`](crate::provider::LockingProvider::release_all).
    pub(super) async fn release_all_inner(&self, owner: Option<&str>) -> Result<u64, LockError> {
        self.inner.conns.check_open()?;
        let n = self.run_release_all(owner).await?;
        if let Some(w) = &self.inner.waiting {
            w.unmark_owner(owner);
        }
        Ok(n)
    }

    /// `release_all.lua` on one server.
    pub(super) async fn release_all_single(&self, owner: Option<&str>) -> Result<u64, LockError> {
        let layout = &self.inner.layout;
        let channel_prefix = self.channel_prefix();
        match owner {
            Some(owner) => {
                self.release_all_script(ReleaseAllArgs::Owner {
                    index: &layout.owner_index(owner),
                    owner,
                    claim_ms: self.inner.claim_ms,
                    channel_prefix,
                })
                .await
            }
            None => {
                self.release_all_script(ReleaseAllArgs::Namespace {
                    namespace: layout.namespace(),
                    pattern: &layout.scan_pattern(),
                    channel_prefix,
                })
                .await
            }
        }
    }

    async fn release_all_script(&self, args: ReleaseAllArgs<'_>) -> Result<u64, LockError> {
        let reply = self
            .inner
            .conns
            .eval("release_all", &RELEASE_ALL, &args.keys(), &args.argv())
            .await?;
        ReleaseAllArgs::decode(reply)
    }
}
