//! Random identifiers: `execute`'s owners and run ids.
//!
//! Both come from UUID v4, i.e. 122 bits from the operating system's CSPRNG
//! (`getrandom`), so an owner cannot be guessed by another client.

use uuid::Uuid;

/// A fresh owner for one `execute` call: `execute:<32 hex digits>`.
pub(crate) fn execute_owner() -> String {
    format!("execute:{}", Uuid::new_v4().simple())
}

/// A fresh run id (32 hex digits).
pub(crate) fn random_id() -> String {
    Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let o = execute_owner();
        assert!(o.starts_with("execute:") && o.len() == 8 + 32);
        assert_ne!(random_id(), random_id());
    }
}
