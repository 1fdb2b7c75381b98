//! The provider contract (`tests/contract/mod.rs`) on the in-memory provider.

mod contract;

use std::sync::Arc;

use contract::{Fixture, contract_suite};
use lockstep::{InMemoryProvider, LockingModule};

async fn fixture() -> Fixture {
    let provider = InMemoryProvider::new();
    let module = LockingModule::builder()
        .in_memory(provider.clone())
        .build()
        .unwrap();
    let peer = LockingModule::builder()
        .in_memory(provider.clone())
        .build()
        .unwrap();
    Fixture {
        module,
        peer,
        provider: Arc::new(provider),
    }
}

contract_suite!(fixture);
