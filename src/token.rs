//! Random identifiers: owner tokens and acquisition nonces.
//!
//! Both come from UUID v4, i.e. 122 bits from the operating system's CSPRNG
//! (`getrandom`), so an owner token cannot be guessed by another client.

use uuid::Uuid;

/// The length of an acquisition nonce, in bytes. The Lua scripts rely on it
/// (`NONCE_LEN`).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const NONCE_LEN: usize = 12;

/// A fresh owner for one `execute` call: `execute:<32 hex digits>`.
pub(crate) fn execute_owner() -> String {
    format!("execute:{}", Uuid::new_v4().simple())
}

/// A fresh run id (32 hex digits).
pub(crate) fn random_id() -> String {
    Uuid::new_v4().simple().to_string()
}

/// A nonce of [`NONCE_LEN`] base64url characters (72 random bits), unique
/// to one acquisition. Twelve bytes keep a lock's value small enough for
/// Redis's compact string encoding.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn nonce() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // The low 72 bits of a v4 UUID are random (its fixed bits are in bytes 6 and 8).
    let mut bits = Uuid::new_v4().as_u128();
    (0..NONCE_LEN)
        .map(|_| {
            let c = ALPHABET[(bits & 63) as usize] as char;
            bits >>= 6;
            c
        })
        .collect()
}

/// A random fraction in [0, 1), for jitter.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn unit_random() -> f64 {
    // The low 53 bits are random (UUID v4 fixes bits in bytes 6 and 8 only).
    const BITS: u32 = 53;
    let r = Uuid::new_v4().as_u128() & ((1u128 << BITS) - 1);
    r as f64 / (1u64 << BITS) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(nonce().len(), NONCE_LEN);
        assert_ne!(nonce(), nonce());
        let o = execute_owner();
        assert!(o.starts_with("execute:") && o.len() == 8 + 32);
        for _ in 0..1000 {
            let r = unit_random();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
