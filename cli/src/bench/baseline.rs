//! `--baseline` for W1: redis-benchmark running the acquire script.

use super::BenchArgs;

/// `redis-benchmark -c 50 -P 16` running the acquire script (EVALSHA) on
/// the same server; its EVALSHA requests per second. Keys are drawn from
/// 10^8, so nearly every call takes a free lock, as every W1 call does.
pub(super) async fn baseline(url: &str, args: &BenchArgs) -> Option<f64> {
    let port = url
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse::<u16>()
        .ok()?;
    // Load the script exactly as the provider does (prelude + acquire.lua).
    let script = redis::Script::new(concat!(
        include_str!("../../../lua/prelude.lua"),
        "\n",
        include_str!("../../../lua/acquire.lua")
    ));
    let mut c = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let sha: String = script.prepare_invoke().load_async(&mut c).await.ok()?;
    let requests = ((args.duration * 100_000.0) as u64)
        .max(100_000)
        .to_string();
    // The same call shape as the workload: with an owner, its index too.
    let port = port.to_string();
    let ttl = args.ttl_ms.to_string();
    let mut command = tokio::process::Command::new("redis-benchmark");
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-c",
            "50",
            "-P",
            "16",
            "-n",
            &requests,
        ])
        .args(["-r", "100000000", "--csv", "EVALSHA", &sha])
        .arg(if args.anonymous { "3" } else { "4" })
        .args([
            "bench:{k__rand_int__}",
            "bench:{T}:f",
            "bench:{k__rand_int__}:q",
        ]);
    if !args.anonymous {
        command.arg("bench:{w__rand_int__}:o");
    }
    let out = command
        .args(["1", if args.anonymous { "" } else { "worker-1" }])
        .args([
            "0123456789ab",
            &ttl,
            "",
            "",
            "1",
            "10000",
            "2000",
            "bench:c:",
            "0",
        ])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: "test","rps",...; the second line holds the numbers.
    let line = text.lines().find(|l| l.starts_with("\"EVALSHA"))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}
