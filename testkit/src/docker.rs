//! The fallback when no redis-server is installed: Redis 7 in Docker, with
//! the `testcontainers` feature of this crate.

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{GenericImage, ImageExt};

/// Redis 7 in Docker, if a Docker engine answers.
pub(crate) fn start() -> Option<(String, Box<dyn std::any::Any + Send + Sync>)> {
    let container = GenericImage::new("redis", "7")
        .with_exposed_port(6379.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_cmd(["redis-server", "--save", "", "--appendonly", "no"])
        .start()
        .ok()?;
    let host = container.get_host().ok()?;
    let port = container.get_host_port_ipv4(6379).ok()?;
    Some((format!("redis://{host}:{port}"), Box::new(container)))
}
