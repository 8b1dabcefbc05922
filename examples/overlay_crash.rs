//! Long-running crash-consistency run of the overlay engine.
//!
//! `cargo run --release --example overlay_crash -- [SEED] [ROUNDS]` (defaults: random seed,
//! 1000 rounds). Prints a summary; exits non-zero on any violation, printing the seed and the
//! operations that led to it.

use imgcache::overlay::harness;

fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let rounds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let t = std::time::Instant::now();
    let s = harness::run(seed, rounds);
    println!(
        "seed {seed}: {} of {rounds} rounds passed in {:.1?}; {} ops ({} writes, {} FUA, {} zero/trim, \
         {} flushes, {} snapshot ops, {} hydrates); crashes: {} process death, {} power loss, \
         {} torn power loss; {} blocks checked",
        s.rounds,
        t.elapsed(),
        s.ops,
        s.writes,
        s.fua_writes,
        s.zeroes,
        s.flushes,
        s.snapshot_ops,
        s.hydrates,
        s.crashes[0],
        s.crashes[1],
        s.crashes[2],
        s.blocks_checked
    );
    for f in &s.failures {
        eprintln!("{f}");
    }
    if !s.failures.is_empty() {
        std::process::exit(1);
    }
}
