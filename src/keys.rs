//! Lock keys as callers pass them: one string or a list.

use crate::error::InvalidInput;

/// The longest key accepted, in bytes. Longer keys get
/// [`InvalidInput::KeyTooLong`]: a lock name is an identifier, and a
/// megabyte-long one is far more likely a bug than a name.
pub const MAX_KEY_LEN: usize = 1024;

/// The most distinct keys one request may lock. Every key of a request is
/// handled in one atomic step, which blocks a Redis server while it runs.
pub const MAX_KEYS: usize = 1000;

/// The longest owner id accepted, in bytes.
pub const MAX_OWNER_LEN: usize = 512;

/// One or more lock keys, in the caller's order.
///
/// Built from a `&str`, a `String`, or a slice, array or `Vec` of either, so
/// every operation accepts "one string or a list" as Medusa's do:
///
/// ```
/// use lockstep::Keys;
/// let one: Keys = "order_1".into();
/// let many: Keys = ["order_1", "order_2"].into();
/// assert_eq!(many.as_slice(), ["order_1", "order_2"]);
/// # let _ = one;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keys(Vec<String>);

impl Keys {
    /// The keys as given.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Checks the keys and removes repeats, keeping each key's first
    /// position: `["a", "b", "a"]` locks `a` and `b` once each.
    ///
    /// # Errors
    ///
    /// [`InvalidInput::NoKeys`], [`InvalidInput::EmptyKey`],
    /// [`InvalidInput::KeyTooLong`] or [`InvalidInput::TooManyKeys`].
    pub(crate) fn validated(self) -> Result<Vec<String>, InvalidInput> {
        if self.0.is_empty() {
            return Err(InvalidInput::NoKeys);
        }
        // A few keys (the common case: one) are compared with each other
        // directly, without a set and a copy of each key for it.
        let small = self.0.len() <= 16;
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<String> = Vec::with_capacity(self.0.len());
        for key in self.0 {
            if key.is_empty() {
                return Err(InvalidInput::EmptyKey);
            }
            if key.len() > MAX_KEY_LEN {
                return Err(InvalidInput::KeyTooLong {
                    len: key.len(),
                    max: MAX_KEY_LEN,
                });
            }
            let new = if small {
                !out.contains(&key)
            } else {
                seen.insert(key.clone())
            };
            if new {
                out.push(key);
            }
        }
        if out.len() > MAX_KEYS {
            return Err(InvalidInput::TooManyKeys {
                count: out.len(),
                max: MAX_KEYS,
            });
        }
        Ok(out)
    }
}

/// Checks an owner id.
pub(crate) fn validate_owner(owner: Option<&str>) -> Result<(), InvalidInput> {
    match owner {
        Some("") => Err(InvalidInput::EmptyOwner),
        Some(o) if o.contains('\0') => Err(InvalidInput::NulInOwner),
        Some(o) if o.len() > MAX_OWNER_LEN => Err(InvalidInput::OwnerTooLong {
            len: o.len(),
            max: MAX_OWNER_LEN,
        }),
        _ => Ok(()),
    }
}

impl From<&str> for Keys {
    fn from(key: &str) -> Self {
        Keys(vec![key.to_owned()])
    }
}

impl From<String> for Keys {
    fn from(key: String) -> Self {
        Keys(vec![key])
    }
}

impl From<&String> for Keys {
    fn from(key: &String) -> Self {
        Keys(vec![key.clone()])
    }
}

impl<S: AsRef<str>> From<Vec<S>> for Keys {
    fn from(keys: Vec<S>) -> Self {
        Keys(keys.iter().map(|k| k.as_ref().to_owned()).collect())
    }
}

impl<S: AsRef<str>> From<&[S]> for Keys {
    fn from(keys: &[S]) -> Self {
        Keys(keys.iter().map(|k| k.as_ref().to_owned()).collect())
    }
}

impl<S: AsRef<str>, const N: usize> From<[S; N]> for Keys {
    fn from(keys: [S; N]) -> Self {
        Keys(keys.iter().map(|k| k.as_ref().to_owned()).collect())
    }
}

impl<S: AsRef<str>, const N: usize> From<&[S; N]> for Keys {
    fn from(keys: &[S; N]) -> Self {
        Keys(keys.iter().map(|k| k.as_ref().to_owned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_removed_in_first_seen_order() {
        let keys = Keys::from(["b", "a", "b", "c", "a"]).validated().unwrap();
        assert_eq!(keys, ["b", "a", "c"]);
    }

    #[test]
    fn bad_keys_are_rejected() {
        let none: Vec<String> = vec![];
        assert_eq!(Keys::from(none).validated(), Err(InvalidInput::NoKeys));
        assert_eq!(
            Keys::from(["a", ""]).validated(),
            Err(InvalidInput::EmptyKey)
        );
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(
            Keys::from(long).validated(),
            Err(InvalidInput::KeyTooLong { .. })
        ));
        assert!(Keys::from("x".repeat(MAX_KEY_LEN)).validated().is_ok());
        let many: Vec<String> = (0..=MAX_KEYS).map(|i| i.to_string()).collect();
        assert!(matches!(
            Keys::from(many).validated(),
            Err(InvalidInput::TooManyKeys { .. })
        ));
    }

    #[test]
    fn owners_are_checked() {
        assert_eq!(validate_owner(Some("")), Err(InvalidInput::EmptyOwner));
        assert!(validate_owner(None).is_ok());
        assert!(validate_owner(Some("*")).is_ok());
        assert_eq!(validate_owner(Some("\0p1")), Err(InvalidInput::NulInOwner));
        assert!(validate_owner(Some(&"o".repeat(MAX_OWNER_LEN + 1))).is_err());
    }
}
