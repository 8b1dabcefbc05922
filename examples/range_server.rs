//! An HTTP file server with `Range` support, latency and a bandwidth cap: a stand-in for an
//! image server, for trying and benchmarking lazy pulling.
//!
//! ```sh
//! cargo run --example range_server -- --root /srv/images --listen 127.0.0.1:8080 \
//!     --latency-ms 20 --rate-mbit 200
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[path = "../tests/common_remote/range_server.rs"]
mod range_server;

use range_server::{RangeServer, RangeServerConfig};

/// Serve the files under --root over HTTP, with Range support.
#[derive(Parser)]
struct Args {
    /// The directory whose files are served (`/NAME` is `ROOT/NAME`).
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Delay before answering each request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Bandwidth cap over all responses together, in Mbit/s (unlimited when absent).
    #[arg(long)]
    rate_mbit: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.root.is_dir(),
        "--root {} is not a directory",
        args.root.display()
    );
    if let Some(rate) = args.rate_mbit {
        anyhow::ensure!(rate > 0.0, "--rate-mbit must be more than 0");
    }
    let config = RangeServerConfig {
        root: args.root,
        latency: Duration::from_millis(args.latency_ms),
        rate: args.rate_mbit.map(|m| (m * 1_000_000.0 / 8.0) as u64),
    };
    let server = RangeServer::start(config, args.listen).await?;
    println!("listening on {}", server.url());
    tokio::select! {
        _ = server.wait() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
