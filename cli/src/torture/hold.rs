//! `lockstep hold`: one lock holder as a process of its own, for fault
//! injection (kill it, pause it). Hidden: tests and `torture` use it.

use std::time::Duration;

use lockstep::{AcquireOptions, ExecuteOptions};

use super::fenced::FencedStore;
use crate::failure::{EXIT_OK, EXIT_WRONG, Failure};

#[derive(Debug, clap::Args)]
pub(crate) struct HoldArgs {
    #[command(flatten)]
    redis: crate::backend::BackendArgs,
    /// The lock to hold.
    #[arg(long)]
    key: String,
    /// Its lease, ms.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// Hold it under `execute` (renewed every third of the lease) and write
    /// to a fenced store until the lease is lost; without it, take the lock
    /// once and sleep until killed.
    #[arg(long)]
    renew: bool,
    /// The fenced store's Redis (with --renew).
    #[arg(long)]
    store_url: Option<String>,
    /// Pause between two writes, ms (with --renew).
    #[arg(long, default_value_t = 50)]
    write_every_ms: u64,
}

/// Prints, one per line: `held <token>`, then with --renew `write <token>
/// accepted|rejected` for each write and `lost` when the lease is gone,
/// and finally `execute: <outcome>`.
pub(crate) async fn hold(args: HoldArgs) -> Result<u8, Failure> {
    let locking = args.redis.connect().await.map_err(Failure::usage)?.module;
    let lease = Duration::from_millis(args.lease_ms);
    if !args.renew {
        let held = locking
            .acquire(
                args.key.as_str(),
                AcquireOptions::new()
                    .owner_id(format!("holder-{}", std::process::id()))
                    .expire(lease),
            )
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
        println!("held {}", held.fencing_token());
        std::future::pending::<()>().await;
    }
    let store_url = args
        .store_url
        .as_deref()
        .ok_or_else(|| Failure::usage("--renew needs --store-url"))?;
    let store = FencedStore::connect(store_url, "fenced")
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    let pause = Duration::from_millis(args.write_every_ms);
    let key = args.key.clone();
    let outcome = locking
        .execute(
            args.key.as_str(),
            ExecuteOptions::new().expire(lease),
            |held| async move {
                println!("held {}", held.fencing_token());
                loop {
                    // Write first, then look at the signal: after a pause, the
                    // first write is the late one a fenced store must refuse.
                    let token = held.fencing_token();
                    match store
                        .write(&key, token, &format!("holder {}", std::process::id()))
                        .await
                    {
                        Ok(true) => println!("write {token} accepted"),
                        Ok(false) => println!("write {token} rejected"),
                        Err(e) => println!("write {token} failed: {e}"),
                    }
                    if held.is_cancelled() {
                        println!("lost");
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            },
        )
        .await;
    match outcome {
        Ok(()) => {
            println!("execute: ok");
            Ok(EXIT_OK)
        }
        Err(e) => {
            println!("execute: {e}");
            Ok(EXIT_WRONG)
        }
    }
}
