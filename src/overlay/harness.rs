//! Crash-consistency harness: random operations against an [`Overlay`] on [`SimStorage`] and
//! a plain in-memory model, crashes at random points, reopen, check.
//!
//! The model keeps, for every 4 KiB block, the list of contents it may show after a crash:
//! its content at the last durable point (flush, FUA write of that block, snapshot operation,
//! resize, reopen) followed by every content it had since. After a crash, each 512-byte
//! sector of each block must equal that sector of one of those versions (a power loss may
//! tear an unsynced block at sector granularity). So: durable writes read back, nothing reads
//! as data never written to that block, and the base is never changed. Snapshots (durable
//! operations) must exist with their exact content. Used by the unit tests (a few hundred
//! rounds) and by `examples/overlay_crash.rs` (long runs).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::map::BLOCK;
use super::sim::{CrashMode, SimRng, SimStorage};
use super::Overlay;

const B: usize = BLOCK as usize;
const SECTOR: usize = 512;

/// Totals over a run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub rounds: u64,
    pub ops: u64,
    pub writes: u64,
    pub fua_writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub snapshot_ops: u64,
    pub hydrates: u64,
    pub crashes: [u64; 3],
    pub blocks_checked: u64,
    pub failures: Vec<String>,
}

struct Model {
    base: Vec<u8>,
    base_len: usize,
    content: Vec<u8>,
    versions: Vec<Vec<Vec<u8>>>,
    snapshots: BTreeMap<String, Vec<u8>>,
}

impl Model {
    fn blocks(&self) -> usize {
        self.content.len() / B
    }

    fn collapse_all(&mut self) {
        for (b, v) in self.versions.iter_mut().enumerate() {
            v.clear();
            v.push(self.content[b * B..(b + 1) * B].to_vec());
        }
    }

    fn record(&mut self, offset: usize, len: usize, durable: bool) {
        if len == 0 {
            return;
        }
        for b in offset / B..=(offset + len - 1) / B {
            let cur = self.content[b * B..(b + 1) * B].to_vec();
            if durable {
                self.versions[b].clear();
            }
            if self.versions[b].last() != Some(&cur) {
                self.versions[b].push(cur);
            }
        }
    }
}

fn crash_mode(rng: &mut SimRng) -> CrashMode {
    match rng.below(3) {
        0 => CrashMode::ProcessDeath,
        1 => CrashMode::PowerLoss,
        _ => CrashMode::PowerLossTorn,
    }
}

fn mode_index(m: CrashMode) -> usize {
    match m {
        CrashMode::ProcessDeath => 0,
        CrashMode::PowerLoss => 1,
        CrashMode::PowerLossTorn => 2,
    }
}

/// Run one round (create, random ops with crashes, checks). `Err` describes the first
/// violation with the operations that led to it.
pub fn run_round(seed: u64, summary: &mut Summary) -> Result<(), String> {
    let mut rng = SimRng::new(seed);
    let blocks = 16 + rng.below(48) as usize;
    let size = blocks * B;
    let base_len = if rng.chance(1, 3) {
        size - rng.below(2 * B as u64) as usize
    } else {
        size
    };
    let base: Vec<u8> = (0..base_len).map(|_| rng.next_u64() as u8).collect();
    let base_copy = base.clone();
    let mut content = vec![0u8; size];
    content[..base_len].copy_from_slice(&base);
    let mut model = Model {
        base,
        base_len,
        versions: Vec::new(),
        content,
        snapshots: BTreeMap::new(),
    };
    model.versions = vec![Vec::new(); blocks];
    model.collapse_all();

    let mut log: Vec<String> = Vec::new();
    let fail = |log: &Vec<String>, what: String| -> String {
        let tail: Vec<&String> = log.iter().rev().take(40).collect::<Vec<_>>();
        let mut s = format!("seed {seed}: {what}\nlast ops (newest first):\n");
        for l in tail {
            s.push_str("  ");
            s.push_str(l);
            s.push('\n');
        }
        s
    };

    let mut storage = SimStorage::new();
    let mut ov = Overlay::create(Arc::new(storage.clone()), size as u64, base_len as u64)
        .map_err(|e| format!("seed {seed}: create: {e}"))?;
    let small_journal = rng.chance(1, 2);
    if small_journal {
        ov.set_journal_limit(1 + rng.below(4096));
    }
    let crashes = 1 + rng.below(3);
    let mut next_snap = 0u32;
    for _crash in 0..crashes {
        let nops = 5 + rng.below(60);
        for _ in 0..nops {
            summary.ops += 1;
            let size = model.content.len();
            let r = rng.below(100);
            let res = if r < 45 {
                // Write: aligned blocks or any byte range.
                let (off, len) = if rng.chance(1, 2) {
                    let b = rng.below((size / B) as u64) as usize;
                    let n = 1 + rng.below(4.min((size / B - b) as u64)) as usize;
                    (b * B, n * B)
                } else {
                    let off = rng.below(size as u64) as usize;
                    let len = 1 + rng.below((3 * B).min(size - off) as u64) as usize;
                    (off, len)
                };
                let fua = rng.chance(1, 8);
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                log.push(format!("write {off}+{len} fua={fua}"));
                summary.writes += 1;
                summary.fua_writes += fua as u64;
                let r = ov.write(off as u64, &data, fua, &model.base);
                if r.is_ok() {
                    model.content[off..off + len].copy_from_slice(&data);
                    model.record(off, len, fua);
                }
                r
            } else if r < 60 {
                let off = rng.below(size as u64) as usize;
                let len = if rng.chance(1, 2) {
                    1 + rng.below((3 * B).min(size - off) as u64) as usize
                } else {
                    size - off
                };
                let fua = rng.chance(1, 8);
                log.push(format!("zero {off}+{len} fua={fua}"));
                summary.zeroes += 1;
                let r = ov.write_zeroes(off as u64, len as u64, fua, &model.base);
                if r.is_ok() {
                    model.content[off..off + len].fill(0);
                    model.record(off, len, fua);
                }
                r
            } else if r < 72 {
                log.push("flush".into());
                summary.flushes += 1;
                let r = ov.flush();
                if r.is_ok() {
                    model.collapse_all();
                }
                r
            } else if r < 80 {
                // Hydrate: the flattener copies base data into unwritten blocks.
                let b = rng.below((size / B) as u64) as usize;
                let n = 1 + rng.below(8.min((size / B - b) as u64)) as usize;
                let end = ((b + n) * B).min(size);
                let mut data = vec![0u8; end - b * B];
                let from_base = model.base_len.saturating_sub(b * B).min(data.len());
                if from_base > 0 {
                    data[..from_base].copy_from_slice(&model.base[b * B..b * B + from_base]);
                }
                log.push(format!("hydrate {}+{}", b * B, data.len()));
                summary.hydrates += 1;
                ov.hydrate((b * B) as u64, &data).map(|_| ())
            } else if r < 86 {
                let name = format!("s{next_snap}");
                next_snap += 1;
                log.push(format!("snapshot {name}"));
                summary.snapshot_ops += 1;
                let r = ov.snapshot(&name);
                if r.is_ok() {
                    model.snapshots.insert(name, model.content.clone());
                    model.collapse_all();
                }
                r
            } else if r < 90 && !model.snapshots.is_empty() {
                let i = rng.below(model.snapshots.len() as u64) as usize;
                let name = model.snapshots.keys().nth(i).cloned().unwrap_or_default();
                log.push(format!("revert {name}"));
                summary.snapshot_ops += 1;
                let r = ov.revert(&name);
                if r.is_ok() {
                    let c = model.snapshots[&name].clone();
                    model.content = c;
                    let nb = model.blocks();
                    model.versions.resize(nb, Vec::new());
                    model.collapse_all();
                }
                r
            } else if r < 94 && !model.snapshots.is_empty() {
                let i = rng.below(model.snapshots.len() as u64) as usize;
                let name = model.snapshots.keys().nth(i).cloned().unwrap_or_default();
                log.push(format!("delete {name}"));
                summary.snapshot_ops += 1;
                let r = ov.delete_snapshot(&name);
                if r.is_ok() {
                    model.snapshots.remove(&name);
                    model.collapse_all();
                }
                r
            } else if r < 96 {
                let grow = (1 + rng.below(4) as usize) * B;
                log.push(format!("resize +{grow}"));
                let r = ov.resize((size + grow) as u64);
                if r.is_ok() {
                    model.content.resize(size + grow, 0);
                    model.versions.resize(model.blocks(), Vec::new());
                    model.collapse_all();
                }
                r
            } else {
                // Read back some range and compare with the model now.
                let off = rng.below(size as u64) as usize;
                let len = 1 + rng.below((2 * B).min(size - off) as u64) as usize;
                let mut buf = vec![0u8; len];
                log.push(format!("read {off}+{len}"));
                ov.read(off as u64, &mut buf, &model.base).and_then(|_| {
                    if buf != model.content[off..off + len] {
                        Err(super::OverlayError::Corrupt("live read mismatch".into()))
                    } else {
                        Ok(())
                    }
                })
            };
            if let Err(e) = res {
                return Err(fail(&log, format!("operation failed: {e}")));
            }
        }

        // Crash.
        let mode = crash_mode(&mut rng);
        log.push(format!("CRASH {mode:?}"));
        summary.crashes[mode_index(mode)] += 1;
        let after = storage.crash(mode, &mut rng);
        drop(ov);
        storage = after;
        ov = Overlay::open(Arc::new(storage.clone()))
            .map_err(|e| fail(&log, format!("reopen failed: {e}")))?;
        if small_journal {
            ov.set_journal_limit(1 + rng.below(4096));
        }
        if ov.size() as usize != model.content.len() {
            return Err(fail(
                &log,
                format!("size {} != {}", ov.size(), model.content.len()),
            ));
        }
        let mut buf = vec![0u8; model.content.len()];
        ov.read(0, &mut buf, &model.base)
            .map_err(|e| fail(&log, format!("read after reopen: {e}")))?;
        for (b, versions) in model.versions.iter().enumerate() {
            summary.blocks_checked += 1;
            let got = &buf[b * B..(b + 1) * B];
            for s in 0..B / SECTOR {
                let r = s * SECTOR..(s + 1) * SECTOR;
                if !versions.iter().any(|v| v[r.clone()] == got[r.clone()]) {
                    return Err(fail(
                        &log,
                        format!(
                            "block {b} sector {s} reads data never written there \
                             ({} acceptable versions)",
                            versions.len()
                        ),
                    ));
                }
            }
        }
        let names: Vec<String> = ov.list_snapshots().into_iter().map(|s| s.name).collect();
        let want: Vec<String> = model.snapshots.keys().cloned().collect();
        if names != want {
            return Err(fail(&log, format!("snapshots {names:?} != {want:?}")));
        }
        if let Some((name, content)) = model.snapshots.iter().next_back() {
            let dst = SimStorage::new();
            let c = ov
                .clone_snapshot(name, Arc::new(dst))
                .map_err(|e| fail(&log, format!("clone {name}: {e}")))?;
            let mut sbuf = vec![0u8; content.len()];
            c.read(0, &mut sbuf, &model.base)
                .map_err(|e| fail(&log, format!("read clone: {e}")))?;
            if &sbuf != content {
                return Err(fail(&log, format!("snapshot {name} content changed")));
            }
        }
        // After reopen, what reads is durable (open writes a checkpoint).
        model.content = buf;
        model.collapse_all();
        if model.base != base_copy {
            return Err(fail(&log, "base changed".into()));
        }
    }
    summary.rounds += 1;
    Ok(())
}

/// Run `rounds` rounds with seeds `seed, seed+1, ...`; failures are collected, not fatal.
pub fn run(seed: u64, rounds: u64) -> Summary {
    let mut s = Summary::default();
    for i in 0..rounds {
        if let Err(e) = run_round(seed.wrapping_add(i), &mut s) {
            s.failures.push(e);
        }
    }
    s
}
