//! Small pieces of the wire format: acquisition nonces, milliseconds, and
//! URLs as they may appear in messages.

use crate::random;

/// The length of an acquisition nonce, in bytes. The Lua scripts rely on it
/// (`NONCE_LEN` in `lua/prelude.lua` and `lua/extend.lua`).
pub(crate) const NONCE_LEN: usize = 12;

/// A nonce of [`NONCE_LEN`] base64url characters, unique to one
/// acquisition. Twelve bytes keep a lock's value small enough for Redis's
/// compact string encoding. For an acquisition without expiry
/// (`permanent`), the first is `.`, which no other nonce has: the scripts
/// index such locks apart (see `lua/prelude.lua`).
pub(crate) fn nonce(permanent: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // 72 random bits, 6 per character.
    let mut bits = u128::from(random::u64()) | u128::from(random::u64() & 0xff) << 64;
    let mut nonce: String = (0..NONCE_LEN)
        .map(|_| {
            let c = ALPHABET[(bits & 63) as usize] as char;
            bits >>= 6;
            c
        })
        .collect();
    if permanent {
        nonce.replace_range(..1, ".");
    }
    nonce
}

/// This host's clock in microseconds since the Unix epoch (0 before it).
pub(crate) fn clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Whole milliseconds, rounded up so that a lease is never shorter than asked.
pub(crate) fn millis_ceil(d: std::time::Duration) -> u64 {
    let ms = d.as_millis() as u64; // <= MAX_DURATION, fits easily
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        ms + 1
    } else {
        ms
    }
}

/// The URL with its password (if any) replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Unparseable: keep the scheme and host part after any '@'.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
            _ => url.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nonces_have_their_length_and_differ() {
        assert_eq!(nonce(false).len(), NONCE_LEN);
        assert_ne!(nonce(false), nonce(false));
        let permanent = nonce(true);
        assert!(permanent.starts_with('.') && permanent.len() == NONCE_LEN);
        assert!((0..100).all(|_| !nonce(false).starts_with('.')));
    }

    /// Every character of a nonce is random: over 4,000 nonces each
    /// position takes (nearly) all 64 symbols. A position fed by the UUID's
    /// fixed bits would take 16 or fewer.
    #[test]
    fn every_nonce_character_is_random() {
        let nonces: Vec<Vec<u8>> = (0..4000).map(|_| nonce(false).into_bytes()).collect();
        for position in 0..NONCE_LEN {
            let distinct: std::collections::HashSet<u8> =
                nonces.iter().map(|n| n[position]).collect();
            assert!(
                distinct.len() > 60,
                "position {position}: {} symbols",
                distinct.len()
            );
        }
    }

    #[test]
    fn millis_round_up() {
        assert_eq!(millis_ceil(Duration::from_micros(1)), 1);
        assert_eq!(millis_ceil(Duration::from_millis(2500)), 2500);
        assert_eq!(millis_ceil(Duration::from_micros(2_500_001)), 2501);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert!(!redact_url("redis://u:hunter2@ho st").contains("hunter2"));
    }
}
