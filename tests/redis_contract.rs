//! The provider contract (`tests/contract/mod.rs`) on the Redis provider,
//! against a real redis-server (see `tests/support/mod.rs`).

mod contract;
mod support;

use std::sync::Arc;

use contract::{Fixture, contract_suite};

async fn fixture() -> Fixture {
    let namespace = support::unique_namespace();
    let provider = support::redis_provider_in(&namespace).await;
    // The peer has its own connection, as another process would.
    let peer = support::module_with(support::redis_provider_in(&namespace).await);
    Fixture {
        module: support::module_with(provider.clone()),
        peer,
        provider: Arc::new(provider),
    }
}

contract_suite!(fixture);
