//! A crash-simulating [`OverlayStorage`]: in memory, it knows which bytes are durable.
//!
//! Every file keeps its durable image (as of its last `sync`) and the log of operations since.
//! [`SimStorage::crash`] produces the storage a reopened overlay would find after
//! - [`CrashMode::ProcessDeath`]: the process died (SIGKILL); the page cache survives, so every
//!   completed write is there;
//! - [`CrashMode::PowerLoss`]: unsynced operations are all dropped;
//! - [`CrashMode::PowerLossTorn`]: a random subset of the unsynced operations reached the disk,
//!   writes split into 512-byte sectors that each survive or not, applied in issue order (a
//!   later write to the same sector may be lost while an earlier one survived). This models
//!   reordering and torn multi-sector writes.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::storage::{OverlayFile, OverlayStorage};

/// A small deterministic random generator (SplitMix64), for the simulator and the harness.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// What survives a simulated crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    ProcessDeath,
    PowerLoss,
    PowerLossTorn,
}

const SECTOR: usize = 512;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { offset: u64, len: u64 },
}

#[derive(Debug, Default, Clone)]
struct FileState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Op>,
}

fn apply(buf: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*offset as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => buf.resize(*len as usize, 0),
        Op::Punch { offset, len } => {
            let start = (*offset as usize).min(buf.len());
            let end = (*offset + *len).min(buf.len() as u64) as usize;
            buf[start..end].fill(0);
        }
    }
}

/// One simulated file.
#[derive(Default)]
pub struct SimFile {
    state: Mutex<FileState>,
}

impl OverlayFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock();
        let cur = &st.current;
        let start = (offset as usize).min(cur.len());
        let end = (offset as usize + buf.len()).min(cur.len());
        let n = end - start;
        buf[..n].copy_from_slice(&cur[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let op = Op::Write {
            offset,
            data: buf.to_vec(),
        };
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        st.durable = st.current.clone();
        st.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let op = Op::SetLen(len);
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let op = Op::Punch { offset, len };
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        Some(self.read_at(buf, offset))
    }
}

impl SimFile {
    fn after_crash(&self, mode: CrashMode, rng: &mut SimRng) -> FileState {
        let st = self.state.lock();
        let image = match mode {
            CrashMode::ProcessDeath => st.current.clone(),
            CrashMode::PowerLoss => st.durable.clone(),
            CrashMode::PowerLossTorn => {
                let mut img = st.durable.clone();
                for op in &st.pending {
                    match op {
                        Op::Write { offset, data } => {
                            // Sector by sector, each kept or not.
                            let mut pos = 0usize;
                            while pos < data.len() {
                                let abs = *offset as usize + pos;
                                let to_boundary = SECTOR - abs % SECTOR;
                                let n = to_boundary.min(data.len() - pos);
                                if rng.chance(1, 2) {
                                    apply(
                                        &mut img,
                                        &Op::Write {
                                            offset: abs as u64,
                                            data: data[pos..pos + n].to_vec(),
                                        },
                                    );
                                }
                                pos += n;
                            }
                        }
                        other => {
                            if rng.chance(1, 2) {
                                apply(&mut img, other);
                            }
                        }
                    }
                }
                img
            }
        };
        FileState {
            durable: image.clone(),
            current: image,
            pending: Vec::new(),
        }
    }
}

/// An in-memory set of files that can be "crashed".
#[derive(Default, Clone)]
pub struct SimStorage {
    files: Arc<Mutex<BTreeMap<String, Arc<SimFile>>>>,
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// The storage a reopened overlay finds after a crash of `mode`. `self` is left as it is
    /// (the crashed process's handles keep working on the old state, unseen by the new one).
    pub fn crash(&self, mode: CrashMode, rng: &mut SimRng) -> SimStorage {
        let files = self.files.lock();
        let mut out = BTreeMap::new();
        for (name, f) in files.iter() {
            let st = f.after_crash(mode, rng);
            out.insert(
                name.clone(),
                Arc::new(SimFile {
                    state: Mutex::new(st),
                }),
            );
        }
        SimStorage {
            files: Arc::new(Mutex::new(out)),
        }
    }

    /// Total bytes written but not yet durable, over all files (for tests).
    pub fn unsynced_ops(&self) -> usize {
        self.files
            .lock()
            .values()
            .map(|f| f.state.lock().pending.len())
            .sum()
    }
}

impl OverlayStorage for SimStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn OverlayFile>> {
        let mut files = self.files.lock();
        match files.get(name) {
            Some(f) => Ok(f.clone()),
            None if create => {
                let f = Arc::new(SimFile::default());
                files.insert(name.to_string(), f.clone());
                Ok(f)
            }
            None => Err(io::Error::new(io::ErrorKind::NotFound, name.to_string())),
        }
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.files.lock().contains_key(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_drops_unsynced_writes_and_keeps_synced_ones() {
        let s = SimStorage::new();
        let f = s.open("f", true).unwrap();
        f.write_at(&[1; 100], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; 100], 0).unwrap();
        let after = s.crash(CrashMode::PowerLoss, &mut SimRng::new(1));
        let mut buf = [0u8; 100];
        after
            .open("f", false)
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert_eq!(buf, [1; 100]);
        let after = s.crash(CrashMode::ProcessDeath, &mut SimRng::new(1));
        after
            .open("f", false)
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert_eq!(buf, [2; 100]);
    }

    #[test]
    fn torn_power_loss_keeps_each_sector_old_or_new() {
        let s = SimStorage::new();
        let f = s.open("f", true).unwrap();
        f.write_at(&[1; 4096], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; 4096], 0).unwrap();
        let mut seen_mixed = false;
        for seed in 0..20 {
            let after = s.crash(CrashMode::PowerLossTorn, &mut SimRng::new(seed));
            let mut buf = [0u8; 4096];
            after
                .open("f", false)
                .unwrap()
                .read_at(&mut buf, 0)
                .unwrap();
            for sector in buf.chunks(512) {
                assert!(sector.iter().all(|&b| b == 1) || sector.iter().all(|&b| b == 2));
            }
            seen_mixed |= buf.contains(&1) && buf.contains(&2);
        }
        assert!(seen_mixed);
    }
}
