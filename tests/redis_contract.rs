//! The provider contract (`tests/contract/mod.rs`) on the Redis provider,
//! against a real redis-server (see `tests/support/mod.rs`), in each of its
//! waiting modes: fair handoff (the default), barging, and polling. The
//! first two run the scripts as the function library (`FCALL`, where the
//! server has functions), polling runs them by `EVALSHA`, so that both ways
//! of calling them pass the whole suite.

mod contract;
mod support;

use std::sync::Arc;

use contract::{Fixture, contract_suite};
use lockstep::{RedisConfig, RedisProvider};

async fn fixture_with(configure: fn(RedisConfig) -> RedisConfig, fifo: bool) -> Fixture {
    let namespace = support::unique_namespace();
    let connect = || async {
        let config = configure(RedisConfig::from_url(support::shared_url()).namespace(&namespace));
        RedisProvider::connect(config)
            .await
            .expect("connect to the test Redis")
    };
    let provider = connect().await;
    // The peer has its own connection, as another process would.
    let peer_provider = connect().await;
    let residue = support::redis_residue(
        vec![provider.clone(), peer_provider.clone()],
        vec![support::shared_url()],
        namespace.clone(),
    );
    Fixture {
        module: support::module_with(provider.clone()),
        peer: support::module_with(peer_provider),
        provider: Arc::new(provider),
        residue,
        fifo,
    }
}

async fn fixture() -> Fixture {
    fixture_with(|c| c, true).await
}

contract_suite!(fixture);

mod barging {
    use super::*;

    async fn fixture() -> Fixture {
        fixture_with(|c| c.fair(false), false).await
    }

    contract_suite!(fixture);
}

mod polling {
    use super::*;

    async fn fixture() -> Fixture {
        fixture_with(|c| c.notifications(false).functions(false), false).await
    }

    contract_suite!(fixture);
}
