//! The provider contract (`tests/contract/mod.rs`) on the in-memory provider.

mod contract;
mod support;

use std::sync::Arc;

use contract::{Fixture, Residue, contract_suite};
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
    let (waiting, held) = (provider.clone(), provider.clone());
    Fixture {
        module,
        peer,
        provider: Arc::new(provider),
        residue: Residue {
            local: Arc::new(move || waiting.waiting_keys()),
            stored: Arc::new(move || {
                let n = held.held();
                Box::pin(async move {
                    (n > 0)
                        .then(|| format!("{n} held locks"))
                        .into_iter()
                        .collect()
                })
            }),
        },
        fifo: false,
    }
}

contract_suite!(fixture);
