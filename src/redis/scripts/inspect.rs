//! The bindings of `lua/inspect.lua` and `lua/force_release.lua`: their
//! KEYS and ARGV, and the lock descriptions they return.

use std::time::{Duration, UNIX_EPOCH};

use redis::Value;

use super::Arg;
use crate::error::LockError;
use crate::inspect::{LockHolder, LockInfo, LockState};
use crate::redis::error::unexpected;
use crate::redis::layout::Layout;

/// KEYS of either script: the locks, then their queues.
pub(crate) fn keys(layout: &Layout, lock_keys: &[String]) -> Vec<String> {
    let mut keys = lock_keys.to_vec();
    keys.extend(lock_keys.iter().map(|k| layout.queue_key(k)));
    keys
}

/// `force_release.lua`'s ARGV.
pub(crate) fn force_release_argv(claim_ms: u64, channel_prefix: &str) -> [Arg<'_>; 2] {
    [claim_ms.into(), channel_prefix.into()]
}

/// Decodes `{now, lock_1, ..., lock_n}` for the locks named `names`.
pub(crate) fn decode(
    operation: &'static str,
    reply: Value,
    names: &[String],
) -> Result<Vec<LockInfo>, LockError> {
    let bad = |what: String| unexpected(operation, what);
    let Value::Array(items) = reply else {
        return Err(bad("not an array".into()));
    };
    let mut items = items.into_iter();
    let now = items
        .next()
        .and_then(|v| int(&v))
        .ok_or_else(|| bad("no clock".into()))?;
    let infos: Vec<LockInfo> = names
        .iter()
        .zip(items.by_ref())
        .map(|(name, lock)| {
            describe(name, lock, now).ok_or_else(|| bad(format!("{name}: bad description")))
        })
        .collect::<Result<_, _>>()?;
    if infos.len() != names.len() || items.next().is_some() {
        return Err(bad("wrong number of locks".into()));
    }
    Ok(infos)
}

/// One lock's description (see `describe` in `lua/prelude.lua`).
fn describe(name: &str, lock: Value, now_ms: i64) -> Option<LockInfo> {
    let Value::Array(f) = lock else { return None };
    let waiting = int(f.get(1)?)?.max(0) as u64;
    let lease =
        |v: &Value| int(v).and_then(|ms| (ms >= 0).then(|| Duration::from_millis(ms as u64)));
    let state = match int(f.first()?)? {
        0 | 3 => LockState::Free,
        2 => LockState::Reserved {
            lease_left: lease(f.get(2)?),
        },
        1 => {
            let owner = text(f.get(2)?)?;
            let acquired = int(f.get(4)?)?.max(0);
            let metadata = text(f.get(6)?)?;
            LockState::Held(
                LockHolder::new(
                    (!owner.is_empty()).then_some(owner),
                    int(f.get(3)?)?.max(0) as u64,
                    UNIX_EPOCH + Duration::from_millis(acquired as u64),
                    Duration::from_millis(now_ms.saturating_sub(acquired).max(0) as u64),
                )
                .with_lease_left(lease(f.get(5)?))
                .with_metadata((!metadata.is_empty()).then_some(metadata)),
            )
        }
        _ => return None,
    };
    Some(LockInfo::new(name, state, waiting))
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn since_epoch(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_held_lock_decodes_with_its_holder() {
        let reply = Value::Array(vec![
            Value::Int(10_000),
            Value::Array(vec![
                Value::Int(1),
                Value::Int(2),
                bulk("run-1"),
                Value::Int(42),
                Value::Int(7_500),
                Value::Int(900),
                bulk("job=x"),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(0)]),
            Value::Array(vec![Value::Int(2), Value::Int(1), Value::Int(300)]),
        ]);
        let names = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let infos = decode("inspect", reply, &names).unwrap();
        let h = infos[0].holder().unwrap();
        assert_eq!(h.owner.as_deref(), Some("run-1"));
        assert_eq!(h.fencing_token, 42);
        assert_eq!(since_epoch(h.acquired_at), 7_500);
        assert_eq!(h.held_for, Duration::from_millis(2_500));
        assert_eq!(h.lease_left, Some(Duration::from_millis(900)));
        assert_eq!(h.metadata.as_deref(), Some("job=x"));
        assert_eq!(infos[0].waiting, 2);
        assert_eq!(infos[1].state, LockState::Free);
        assert_eq!(
            infos[2].state,
            LockState::Reserved {
                lease_left: Some(Duration::from_millis(300))
            }
        );
    }

    #[test]
    fn a_short_reply_is_an_error() {
        let reply = Value::Array(vec![Value::Int(1)]);
        assert!(decode("inspect", reply, &["a".to_owned()]).is_err());
    }
}
