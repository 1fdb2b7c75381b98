//! Release, extend, release_all, force_release, inspect and list: one
//! statement each.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::Row;

use super::{Inner, error};
use crate::error::LockError;
use crate::inspect::{LockHolder, LockInfo, LockState};

/// The most keys of each kind one sweep visits (each holds an advisory
/// lock until the sweep commits: the server's lock table is finite).
const SWEEP_BATCH: i32 = 100;

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn token(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Inner {
    /// Releases `keys` of `owner`; with a `nonce` other than `""` only what
    /// that acquisition took.
    pub(super) async fn release(
        self: &Arc<Self>,
        keys: &[String],
        owner: Option<&str>,
        nonce: &str,
    ) -> Result<Vec<bool>, LockError> {
        const OP: &str = "release";
        let claim_ms = self.claim_ms();
        // A single key released by its holder may go straight to this
        // provider's first waiter for it (`handoff.rs`).
        let offer = if nonce.is_empty() && keys.len() == 1 {
            self.offer(&keys[0])
        } else {
            None
        };
        let next = offer.as_ref().map(|o| &o.request);
        let rows = self
            .query(
                OP,
                &self.sql.release,
                &[
                    &keys,
                    &owner,
                    &nonce,
                    &self.pid,
                    &claim_ms,
                    &next.map(|r| r.owner.as_deref()),
                    &offer.as_ref().map(|o| o.nonce.as_str()),
                    &next.map(|r| r.ttl_ms),
                    &next.map(|r| r.metadata.as_deref()),
                    &offer.as_ref().is_some_and(|o| o.more),
                ],
            )
            .await?;
        let (released, token) = self
            .released(keys, &rows)
            .ok_or_else(|| error::unexpected(OP, "one flag per key expected"))?;
        if let Some(offer) = offer {
            match token {
                Some(token) => offer.granted(token),
                None => offer.declined(),
            }
        }
        Ok(released)
    }

    /// Reads a release's reply (flags per key: 1 released, 2 reserved for
    /// this provider, 4 this provider's multi-key waiters should retry, 8
    /// handed to the offered waiter, whose token follows the flags),
    /// passes each lock reserved for this provider to its first local
    /// waiter and wakes the multi-key ones. The released flags, and the
    /// token of a lock handed over.
    pub(super) fn released(
        self: &Arc<Self>,
        keys: &[String],
        rows: &[Row],
    ) -> Option<(Vec<bool>, Option<u64>)> {
        let mut flags: Vec<i64> = single("release", rows).ok()?;
        let handed = flags.first().is_some_and(|f| f & 8 != 0);
        let token = if handed { flags.pop().map(token) } else { None };
        if flags.len() != keys.len() {
            return None;
        }
        // A lock released here opens its gate; one handed over in place
        // stays marked (its new holder, a waiter here, marks it anew).
        self.unmark_held(
            keys.iter()
                .zip(&flags)
                .filter(|&(_, f)| f & 1 != 0 && f & 8 == 0)
                .map(|(k, _)| k),
        );
        for (key, flag) in keys.iter().zip(&flags) {
            if flag & 2 != 0 {
                self.wake(key, true);
            }
            if flag & 4 != 0 {
                self.wake(key, false);
            }
        }
        Some((flags.iter().map(|f| f & 1 != 0).collect(), token))
    }

    pub(super) async fn extend(
        &self,
        keys: &[String],
        owner: Option<&str>,
        lease: Duration,
    ) -> Result<(), LockError> {
        const OP: &str = "extend";
        let ttl_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1);
        let rows = self
            .query(OP, &self.sql.extend, &[&keys, &owner, &ttl_ms])
            .await?;
        let missing: i32 = single(OP, &rows)?;
        match usize::try_from(missing) {
            Ok(i) => Err(LockError::NotOwner {
                key: keys.get(i).cloned().unwrap_or_default(),
            }),
            Err(_) => Ok(()),
        }
    }

    pub(super) async fn release_all(&self, owner: Option<&str>) -> Result<u64, LockError> {
        const OP: &str = "release_all";
        let claim_ms = self.claim_ms();
        let rows = self
            .query(OP, &self.sql.release_all, &[&owner, &claim_ms])
            .await?;
        let n: i64 = single(OP, &rows)?;
        self.unmark_owner(owner);
        Ok(token(n))
    }

    pub(super) async fn force_release(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<LockInfo>>, LockError> {
        const OP: &str = "force_release";
        let claim_ms = self.claim_ms();
        let rows = self
            .query(OP, &self.sql.force_release, &[&keys, &claim_ms])
            .await?;
        self.unmark_held(keys);
        let mut freed = vec![None; keys.len()];
        for row in &rows {
            let (index, holder) = holder::<i32>(OP, row)?;
            let index = usize::try_from(index).unwrap_or(usize::MAX);
            let Some(slot) = freed.get_mut(index) else {
                return Err(error::unexpected(OP, "a key index out of range"));
            };
            *slot = Some(LockInfo::new(
                keys[index].clone(),
                LockState::Held(holder),
                self.local_waiters(&keys[index]),
            ));
        }
        Ok(freed)
    }

    pub(super) async fn inspect(&self, keys: &[String]) -> Result<Vec<LockInfo>, LockError> {
        const OP: &str = "inspect";
        let rows = self
            .query(OP, &self.sql.inspect, &[&keys, &self.pid])
            .await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let parse = || -> Result<(String, bool, i64), tokio_postgres::Error> {
                // A NULL token: no live lock or reservation.
                let present = row.try_get::<_, Option<i64>>(2)?.is_some();
                Ok((row.try_get(0)?, present, row.try_get(8)?))
            };
            let (key, present, others) =
                parse().map_err(|e| error::unexpected(OP, e.to_string()))?;
            let state = if !present {
                LockState::Free
            } else if row
                .try_get::<_, bool>(7)
                .map_err(|e| error::unexpected(OP, e.to_string()))?
            {
                let lease_left: Option<i64> = row
                    .try_get(5)
                    .map_err(|e| error::unexpected(OP, e.to_string()))?;
                LockState::Reserved {
                    lease_left: lease_left.map(ms),
                }
            } else {
                LockState::Held(holder::<String>(OP, row)?.1)
            };
            found.insert(key, (state, token(others)));
        }
        Ok(keys
            .iter()
            .map(|k| {
                let (state, others) = found.remove(k).unwrap_or((LockState::Free, 0));
                LockInfo::new(k.clone(), state, others + self.local_waiters(k))
            })
            .collect())
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, LockError> {
        const OP: &str = "list";
        let rows = self.query(OP, &self.sql.list, &[&prefix]).await?;
        rows.iter()
            .map(|row| {
                let (key, holder) = holder::<String>(OP, row)?;
                let waiting = self.local_waiters(&key);
                Ok(LockInfo::new(key, LockState::Held(holder), waiting))
            })
            .collect()
    }

    pub(super) async fn sweep(&self) -> Result<u64, LockError> {
        const OP: &str = "sweep";
        self.purge_marks();
        // Upkeep, not an operation: left out of the statement count.
        let rows = self
            .run(OP, &self.sql.sweep, &[&SWEEP_BATCH], false)
            .await?;
        let n: i64 = single(OP, &rows)?;
        Ok(token(n))
    }

    pub(super) async fn shut_down(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.cancel();
        self.wake_all();
        // Let undos under way finish (bounded), then close the pool.
        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.undos.load(std::sync::atomic::Ordering::Acquire) > 0
            && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.pool.close();
    }
}

/// The one value of a one-row, one-column reply.
fn single<T>(operation: &'static str, rows: &[Row]) -> Result<T, LockError>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    match rows {
        [row] => row
            .try_get(0)
            .map_err(|e| error::unexpected(operation, e.to_string())),
        _ => Err(error::unexpected(operation, "one row expected")),
    }
}

/// A row of the inspect, list or force_release query: its first column
/// (the key, or the key's index) and the holder in the six after it.
fn holder<K>(operation: &'static str, row: &Row) -> Result<(K, LockHolder), LockError>
where
    K: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let parse = || -> Result<(K, LockHolder), tokio_postgres::Error> {
        let holder = LockHolder::new(
            row.try_get(1)?,
            token(row.try_get(2)?),
            row.try_get::<_, SystemTime>(3)?,
            ms(row.try_get(4)?),
        )
        .with_lease_left(row.try_get::<_, Option<i64>>(5)?.map(ms))
        .with_metadata(row.try_get(6)?);
        Ok((row.try_get(0)?, holder))
    };
    parse().map_err(|e| error::unexpected(operation, e.to_string()))
}
