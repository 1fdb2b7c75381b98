//! Hash slots in key names: an owner's index split by slot, so that each
//! script finds the index beside the locks it touches.

use crate::redis::layout::{Layout, OwnerIndex, escape, key_slot, slot_tags};

/// The owner index of `owner` in `slot`: `ns{T}:o:esc(owner)` and
/// `ns{T}:p:esc(owner)`, where `T` is the slot's tag.
pub(crate) fn owner_index_in(layout: &Layout, owner: &str, slot: u16) -> OwnerIndex {
    let (before, after) = owner_index_parts(layout, owner);
    let tag = &slot_tags()[slot as usize];
    OwnerIndex {
        expiring: format!("{before}{tag}{after}"),
        // `after` starts with `}:o:`: the permanent part's has `}:p:`.
        permanent: format!("{before}{tag}{}", after.replacen("}:o:", "}:p:", 1)),
    }
}

/// The owner index of `owner` in the slot of `lock_key`.
pub(crate) fn slot_index(layout: &Layout, owner: &str, lock_key: &str) -> OwnerIndex {
    owner_index_in(layout, owner, layout.slot_of(lock_key))
}

/// The owner index of a request whose locks are all in one slot (the one a
/// waiter handed a lock is indexed in), else `None`.
pub(crate) fn request_index(layout: &Layout, locks: &[String], owner: &str) -> Option<OwnerIndex> {
    let slot = layout.slot_of(locks.first()?);
    locks
        .iter()
        .all(|k| layout.slot_of(k) == slot)
        .then(|| owner_index_in(layout, owner, slot))
}

/// The text around the tag in [`owner_index_in`]'s expiring part (the
/// permanent part has `}:p:` where it has `}:o:`).
pub(crate) fn owner_index_parts(layout: &Layout, owner: &str) -> (String, String) {
    (
        format!("{}{{", layout.namespace()),
        format!("}}:o:{}", escape(owner)),
    )
}

/// The slot a tag of [`slot_tags`] stands for.
pub(crate) fn tag_slot(tag: &str) -> Option<u16> {
    let slot = key_slot(tag.as_bytes());
    (slot_tags()[slot as usize] == tag).then_some(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_index_shares_the_slot_of_its_locks() {
        let l = Layout::new("lockstep:");
        for key in ["order_1", "}x", "{a}", "naïve", "line\nbreak", "%7B"] {
            let lock = l.lock_key(key);
            let index = slot_index(&l, "run-{1}", &lock);
            assert_eq!(
                index.permanent,
                index.expiring.replace("}:o:", "}:p:"),
                "the scripts derive one from the other"
            );
            let index = index.expiring;
            assert!(index.ends_with("}:o:run-%7B1%7D"), "{index}");
            let tag = &index["lockstep:{".len()..index.len() - "}:o:run-%7B1%7D".len()];
            assert_eq!(key_slot(tag.as_bytes()), l.slot_of(&lock), "{key}");
            assert_eq!(tag_slot(tag), Some(l.slot_of(&lock)));
        }
        assert_eq!(tag_slot("not a tag"), None);
    }
}
