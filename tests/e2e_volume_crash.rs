//! Crash consistency of volumes at the daemon level: a real client (qemu-io) writes with FUA
//! and flushes while the test SIGKILLs the daemon at random moments; after a restart every
//! write the client saw acknowledged reads back, and the image is untouched.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{have, run_ok, write_image, Daemon, Rng};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Large enough that payloads usually arrive in pieces and land straight in the overlay's
/// memory (a landing) rather than through the input buffer.
const WRITE: u64 = 256 * KIB;
const PER_ROUND: u64 = 48;

fn pattern(round: u64, i: u64) -> u8 {
    (1 + (round * 53 + i * 7) % 254) as u8
}

/// One round: start writing, kill the daemon after `delay`, restart; returns the writes
/// qemu-io reported done (offset, pattern).
fn round(d: &mut Daemon, r: u64, delay: Duration) -> Vec<(u64, u8)> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &d.uri("volumes/v")]);
    for i in 0..PER_ROUND {
        let off = ((r * PER_ROUND + i) * WRITE) % (16 * MIB);
        let fua = if i % 2 == 0 { " -f" } else { "" };
        cmd.args([
            "-c",
            &format!("write{fua} -P {} {off} {WRITE}", pattern(r, i)),
        ]);
        if i % 2 == 1 {
            cmd.args(["-c", "flush"]);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    d.kill_and_restart();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // A write is durable once qemu-io printed it: odd writes only after the following
    // flush succeeded, which qemu-io shows by going on to the next write.
    let done: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("wrote {WRITE}/{WRITE} bytes at offset ")))
        .map(|o| o.trim().parse().unwrap())
        .collect();
    let mut acked = Vec::new();
    for (k, &off) in done.iter().enumerate() {
        let i = (0..PER_ROUND)
            .find(|i| ((r * PER_ROUND + i) * WRITE) % (16 * MIB) == off)
            .unwrap();
        // FUA writes are durable when acknowledged; others once a later write was reported
        // (the flush in between succeeded).
        if i % 2 == 0 || k + 1 < done.len() {
            acked.push((off, pattern(r, i)));
        }
    }
    acked
}

#[test]
fn acknowledged_writes_survive_sigkill_of_the_daemon() {
    assert!(
        have("qemu-io"),
        "qemu-io is not installed: run scripts/test.sh"
    );
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut d = Daemon::start();
    let f = d.dir.path().join("base.raw");
    write_image(&f, 16 * MIB, &[], 3);
    let base = std::fs::read(&f).unwrap();
    d.cli_ok(&["image", "add", "base", "--file", f.to_str().unwrap()]);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    let mut rng = Rng::new(
        std::env::var("CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
    );
    let mut total = 0;

    for r in 0..rounds {
        let delay = Duration::from_millis(5 + rng.below(80));
        let acked = round(&mut d, r, delay);
        // Each slot is written once per round, so an acknowledged write's slot holds its
        // pattern whatever happened to the unacknowledged ones.
        if acked.is_empty() {
            continue;
        }
        let mut check = Command::new("qemu-io");
        check.args(["-f", "raw", &d.uri("volumes/v")]);
        for (off, p) in &acked {
            check.args(["-c", &format!("read -P {p} {off} {WRITE}")]);
        }
        let out = run_ok(&mut check);
        assert!(
            !out.contains("Pattern verification failed"),
            "round {r}: an acknowledged write was lost:\n{out}"
        );
        total += acked.len();
    }
    eprintln!("{rounds} rounds, {total} acknowledged writes verified");
    let img = d.dir.path().join("img.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &d.uri("images/base"),
        img.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&img).unwrap() == base, "the image changed");
}
