//! Inspection (`inspect`, `list`) and `force_release`: `lua/inspect.lua`
//! and `lua/force_release.lua`, and the `SCAN` that lists a namespace's
//! locks without blocking the server.

use super::RedisProvider;
use super::scripts::inspect::{decode, force_release_argv, keys};
use super::scripts::{FORCE_RELEASE, INSPECT};
use crate::error::LockError;
use crate::inspect::{LockInfo, LockState};

/// Lock keys asked for per `SCAN` page (a hint to the server, which
/// returns about this many keys it visited, matching or not).
const SCAN_COUNT: usize = 1000;

impl RedisProvider {
    /// [`LockingProvider::inspect`](crate::provider::LockingProvider::inspect).
    pub(super) async fn inspect_inner(&self, names: &[String]) -> Result<Vec<LockInfo>, LockError> {
        self.inner.conns.check_open()?;
        let layout = &self.inner.layout;
        let lock_keys: Vec<String> = names.iter().map(|k| layout.lock_key(k)).collect();
        self.run_inspect(&lock_keys, names).await
    }

    /// `inspect.lua` once for keys of one slot (or of one server).
    pub(crate) async fn inspect_group(
        &self,
        lock_keys: &[String],
        names: &[String],
    ) -> Result<Vec<LockInfo>, LockError> {
        let reply = self
            .inner
            .conns
            .eval(
                "inspect",
                &INSPECT,
                &keys(&self.inner.layout, lock_keys),
                &[lock_keys.len().into()],
            )
            .await?;
        decode("inspect", reply, names)
    }

    /// `inspect.lua` per hash slot, the results back in the keys' order.
    #[cfg(feature = "cluster")]
    pub(crate) async fn inspect_by_slot(
        &self,
        lock_keys: &[String],
        names: &[String],
    ) -> Result<Vec<LockInfo>, LockError> {
        let layout = &self.inner.layout;
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, k) in lock_keys.iter().enumerate() {
            let slot = layout.slot_of(k);
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, g)) => g.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        use futures_util::future::try_join_all;

        let calls = groups.iter().map(|(_, g)| {
            let keys: Vec<String> = g.iter().map(|&i| lock_keys[i].clone()).collect();
            let names: Vec<String> = g.iter().map(|&i| names[i].clone()).collect();
            async move { self.inspect_group(&keys, &names).await }
        });
        let mut out: Vec<Option<LockInfo>> = vec![None; lock_keys.len()];
        for ((_, g), infos) in groups.iter().zip(try_join_all(calls).await?) {
            for (&i, info) in g.iter().zip(infos) {
                out[i] = Some(info);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// [`LockingProvider::list`](crate::provider::LockingProvider::list):
    /// the namespace's lock keys by `SCAN` (per master on a cluster), each
    /// page inspected as it comes.
    pub(super) async fn list_inner(&self, prefix: &str) -> Result<Vec<LockInfo>, LockError> {
        self.inner.conns.check_open()?;
        let layout = &self.inner.layout;
        let pattern = layout.lock_scan_pattern(prefix);
        let mut found = Vec::new();
        for page in self.scan_lock_keys(&pattern, SCAN_COUNT).await? {
            let (lock_keys, names): (Vec<String>, Vec<String>) = page
                .into_iter()
                .filter_map(|k| layout.key_of(&k).map(|name| (k, name)))
                .unzip();
            for chunk in (0..lock_keys.len()).step_by(SCAN_COUNT) {
                let end = (chunk + SCAN_COUNT).min(lock_keys.len());
                let infos = self
                    .run_inspect(&lock_keys[chunk..end], &names[chunk..end])
                    .await?;
                found.extend(infos.into_iter().filter(|i| i.state != LockState::Free));
            }
        }
        Ok(found)
    }

    /// `SCAN ... MATCH pattern COUNT count TYPE string` to the end on one
    /// server (on the shared connection: each page is one short command,
    /// so other calls interleave with it).
    pub(crate) async fn scan_single(
        &self,
        pattern: &str,
        count: usize,
    ) -> Result<Vec<Vec<String>>, LockError> {
        let mut pages = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .inner
                .conns
                .run("list", |mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(count)
                        .arg("TYPE")
                        .arg("string")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                pages.push(keys);
            }
            if next == 0 {
                return Ok(pages);
            }
            cursor = next;
        }
    }

    /// [`LockingProvider::force_release`](crate::provider::LockingProvider::force_release):
    /// `force_release.lua` per key.
    pub(super) async fn force_release_inner(
        &self,
        names: &[String],
    ) -> Result<Vec<Option<LockInfo>>, LockError> {
        self.inner.conns.check_open()?;
        let layout = &self.inner.layout;
        let mut freed = Vec::with_capacity(names.len());
        for name in names {
            let lock_key = layout.lock_key(name);
            let prefix = self.channel_prefix_for(&lock_key);
            let argv = force_release_argv(self.inner.claim_ms, &prefix);
            let reply = self
                .inner
                .conns
                .eval(
                    "force_release",
                    &FORCE_RELEASE,
                    &keys(layout, std::slice::from_ref(&lock_key)),
                    &argv,
                )
                .await?;
            let info = decode("force_release", reply, std::slice::from_ref(name))?
                .pop()
                .filter(|i| i.holder().is_some());
            // A lock without expiry has an entry in its owner's permanent
            // index, which nothing else would remove (a leased lock's entry
            // expires with the index or is trimmed).
            if let Some(h) = info.as_ref().and_then(|i| i.holder())
                && h.lease_left.is_none()
                && let Some(owner) = &h.owner
            {
                self.forget_permanent(owner, &lock_key).await;
            }
            if let Some(w) = &self.inner.waiting {
                w.unmark_held([&lock_key]);
            }
            freed.push(info);
        }
        Ok(freed)
    }

    /// Removes `lock_key` from the permanent part of `owner`'s index; a
    /// failure leaves an entry that `release_all` skips (it checks holders).
    async fn forget_permanent(&self, owner: &str, lock_key: &str) {
        let index = self.permanent_index_of(owner, lock_key);
        let result: Result<i64, LockError> = self
            .inner
            .conns
            .run("force_release", |mut conn| async move {
                redis::cmd("ZREM")
                    .arg(&index)
                    .arg(lock_key)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "force_release: the owner index keeps a stale entry");
        }
    }
}
