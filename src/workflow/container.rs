//! The container steps resolve services from (Medusa's `container.resolve`).

use std::any::{Any, type_name};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::module::LockingModule;

/// The name the Locking Module is registered under (Medusa's
/// `Modules.LOCKING`).
pub const LOCKING: &str = "locking";

/// Services by name, shared by every step of a run.
///
/// ```
/// use lockstep::LockingModule;
/// use lockstep::workflow::{Container, LOCKING};
///
/// let container = Container::new().with(LOCKING, LockingModule::new());
/// let locking: LockingModule = container.resolve(LOCKING).unwrap();
/// # let _ = locking;
/// ```
///
/// Cloning is cheap; clones share the services.
#[derive(Clone, Default)]
pub struct Container {
    services: Arc<RwLock<HashMap<String, Arc<dyn Any + Send + Sync>>>>,
}

impl Container {
    /// An empty container.
    pub fn new() -> Self {
        Self::default()
    }

    /// A container holding `locking` under [`LOCKING`].
    pub fn with_locking(locking: LockingModule) -> Self {
        Container::new().with(LOCKING, locking)
    }

    /// Registers `service` under `name` (replacing any earlier one) and
    /// returns the container.
    #[must_use]
    pub fn with<T: Any + Send + Sync>(self, name: impl Into<String>, service: T) -> Self {
        self.register(name, service);
        self
    }

    /// Registers `service` under `name`, replacing any earlier one.
    pub fn register<T: Any + Send + Sync>(&self, name: impl Into<String>, service: T) {
        self.services
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), Arc::new(service));
    }

    /// The service registered under `name`, as a `T`.
    ///
    /// # Errors
    ///
    /// [`ResolveError`] when nothing is registered under `name`, or
    /// something of another type.
    pub fn resolve<T: Any + Send + Sync + Clone>(&self, name: &str) -> Result<T, ResolveError> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let service = services.get(name).ok_or_else(|| ResolveError {
            name: name.to_owned(),
            expected: type_name::<T>(),
            registered: false,
        })?;
        service
            .downcast_ref::<T>()
            .cloned()
            .ok_or_else(|| ResolveError {
                name: name.to_owned(),
                expected: type_name::<T>(),
                registered: true,
            })
    }

    /// The Locking Module registered under [`LOCKING`].
    ///
    /// # Errors
    ///
    /// [`ResolveError`] when none is registered.
    pub fn locking(&self) -> Result<LockingModule, ResolveError> {
        self.resolve(LOCKING)
    }
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = services.keys().collect();
        names.sort();
        f.debug_struct("Container")
            .field("services", &names)
            .finish()
    }
}

/// A service could not be resolved from a [`Container`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", if *.registered {
    format!("the service \"{}\" is not a {}", .name, .expected)
} else {
    format!("no service is registered under \"{}\" (expected a {})", .name, .expected)
})]
pub struct ResolveError {
    /// The name asked for.
    pub name: String,
    /// The type asked for.
    pub expected: &'static str,
    /// Whether something (of another type) is registered under the name.
    pub registered: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_by_name_and_type() {
        let c = Container::new().with("answer", 42u32);
        assert_eq!(c.resolve::<u32>("answer"), Ok(42));
        let e = c.resolve::<String>("answer").unwrap_err();
        assert!(e.registered && e.to_string().contains("is not a"));
        let e = c.resolve::<u32>("missing").unwrap_err();
        assert!(!e.registered && e.to_string().contains("no service"));
        assert!(c.locking().is_err());
    }
}
