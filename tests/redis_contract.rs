//! The provider contract (`tests/contract/mod.rs`) on the Redis provider,
//! against a real redis-server (see `tests/support/mod.rs`), in each of its
//! waiting modes: fair handoff (the default), barging, and polling.

mod contract;
mod support;

use std::sync::Arc;

use contract::{Fixture, contract_suite};
use lockstep::{RedisConfig, RedisProvider};

async fn fixture_with(configure: fn(RedisConfig) -> RedisConfig) -> Fixture {
    let namespace = support::unique_namespace();
    let connect = || async {
        let config = configure(RedisConfig::from_url(support::shared_url()).namespace(&namespace));
        RedisProvider::connect(config)
            .await
            .expect("connect to the test Redis")
    };
    let provider = connect().await;
    // The peer has its own connection, as another process would.
    let peer = support::module_with(connect().await);
    Fixture {
        module: support::module_with(provider.clone()),
        peer,
        provider: Arc::new(provider),
    }
}

async fn fixture() -> Fixture {
    fixture_with(|c| c).await
}

contract_suite!(fixture);

mod barging {
    use super::*;

    async fn fixture() -> Fixture {
        fixture_with(|c| c.fair(false)).await
    }

    contract_suite!(fixture);
}

mod polling {
    use super::*;

    async fn fixture() -> Fixture {
        fixture_with(|c| c.notifications(false)).await
    }

    contract_suite!(fixture);
}
