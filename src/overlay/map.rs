//! The block map: for every 4 KiB logical block, where its bytes are.
//!
//! A [`BlockMap`] is a vector of 2 MiB chunks (512 entries). A chunk is either uniform (every
//! entry the same `Base` or `Zero`, no memory) or an `Arc`'d array of entries. Snapshots are
//! clones of the map: chunks are shared and copied on the first change (`Arc::make_mut`), so a
//! snapshot costs one pointer per chunk and the current map stays one flat lookup however many
//! snapshots exist.

use std::sync::Arc;

/// Logical and physical block size in bytes.
pub const BLOCK: u64 = 4096;
/// Entries per chunk.
pub const CHUNK_BLOCKS: u64 = 512;

/// The state of one logical block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Never written: reads from the base (zeros past the base's end).
    Base,
    /// Trimmed or zeroed: reads as zeros, never from the base.
    Zero,
    /// Stored in physical block `n` of the data file.
    Data(u32),
}

/// Largest physical block number (`u32::MAX - 2`, as the encoding reserves 0 and 1).
pub const MAX_PHYS: u32 = u32::MAX - 2;

impl Entry {
    /// On-disk and in-memory encoding: 0 = Base, 1 = Zero, n+2 = Data(n).
    pub fn encode(self) -> u32 {
        match self {
            Entry::Base => 0,
            Entry::Zero => 1,
            Entry::Data(p) => p + 2,
        }
    }

    pub fn decode(v: u32) -> Entry {
        match v {
            0 => Entry::Base,
            1 => Entry::Zero,
            n => Entry::Data(n - 2),
        }
    }

    /// The entry `i` places after `self` in a run (data runs have consecutive blocks).
    pub fn nth(self, i: u64) -> Entry {
        match self {
            Entry::Data(p) => Entry::Data(p + i as u32),
            e => e,
        }
    }
}

#[derive(Clone)]
enum Chunk {
    Uniform(u32),
    Mixed(Arc<[u32; CHUNK_BLOCKS as usize]>),
}

/// A map of logical block → [`Entry`]. Blocks past the covered range are `Base`.
#[derive(Clone, Default)]
pub struct BlockMap {
    chunks: Vec<Chunk>,
}

impl BlockMap {
    /// A map where `blocks` blocks are all `Base`.
    pub fn new(blocks: u64) -> Self {
        let mut m = BlockMap::default();
        m.grow(blocks);
        m
    }

    /// Cover at least `blocks` blocks (new ones `Base`).
    pub fn grow(&mut self, blocks: u64) {
        let n = blocks.div_ceil(CHUNK_BLOCKS) as usize;
        if n > self.chunks.len() {
            self.chunks.resize(n, Chunk::Uniform(0));
        }
    }

    /// Number of blocks covered.
    pub fn blocks(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_BLOCKS
    }

    pub fn get(&self, l: u64) -> Entry {
        match self.chunks.get((l / CHUNK_BLOCKS) as usize) {
            None => Entry::Base,
            Some(Chunk::Uniform(v)) => Entry::decode(*v),
            Some(Chunk::Mixed(a)) => Entry::decode(a[(l % CHUNK_BLOCKS) as usize]),
        }
    }

    /// Set `count` blocks from `l` to `first.nth(i)`; `on_old` sees every `Data` block that was
    /// replaced. Blocks past the covered range extend it.
    pub fn set_run(&mut self, l: u64, count: u64, first: Entry, on_old: &mut dyn FnMut(u32)) {
        self.grow(l + count);
        let mut i = 0u64;
        while i < count {
            let cur = l + i;
            let ci = (cur / CHUNK_BLOCKS) as usize;
            let within = cur % CHUNK_BLOCKS;
            let n = (CHUNK_BLOCKS - within).min(count - i);
            let value = first.nth(i);
            let chunk = &mut self.chunks[ci];
            if n == CHUNK_BLOCKS && !matches!(value, Entry::Data(_)) {
                if let Chunk::Mixed(a) = chunk {
                    for &v in a.iter() {
                        if let Entry::Data(p) = Entry::decode(v) {
                            on_old(p);
                        }
                    }
                }
                *chunk = Chunk::Uniform(value.encode());
            } else {
                if let Chunk::Uniform(u) = *chunk {
                    *chunk = Chunk::Mixed(Arc::new([u; CHUNK_BLOCKS as usize]));
                }
                let Chunk::Mixed(a) = chunk else {
                    unreachable!("made mixed above")
                };
                let a = Arc::make_mut(a);
                for j in 0..n {
                    let slot = &mut a[(within + j) as usize];
                    if let Entry::Data(p) = Entry::decode(*slot) {
                        on_old(p);
                    }
                    *slot = value.nth(j).encode();
                }
            }
            i += n;
        }
    }

    /// Every `Data` entry, as `(logical, physical)`.
    pub fn for_each_data(&self, f: &mut dyn FnMut(u64, u32)) {
        for (ci, c) in self.chunks.iter().enumerate() {
            if let Chunk::Mixed(a) = c {
                for (j, &v) in a.iter().enumerate() {
                    if let Entry::Data(p) = Entry::decode(v) {
                        f(ci as u64 * CHUNK_BLOCKS + j as u64, p);
                    }
                }
            }
        }
    }

    /// Maximal runs `(first logical block, count, first entry)` of entries that are not `Base`,
    /// where a run is constant `Zero` or consecutive `Data` blocks. In logical order.
    pub fn runs(&self) -> Vec<(u64, u64, Entry)> {
        let mut out: Vec<(u64, u64, Entry)> = Vec::new();
        let mut push = |l: u64, n: u64, e: Entry| {
            if e == Entry::Base {
                return;
            }
            if let Some(last) = out.last_mut() {
                if last.0 + last.1 == l && last.2.nth(last.1) == e {
                    last.1 += n;
                    return;
                }
            }
            out.push((l, n, e));
        };
        for (ci, c) in self.chunks.iter().enumerate() {
            let base = ci as u64 * CHUNK_BLOCKS;
            match c {
                Chunk::Uniform(v) => push(base, CHUNK_BLOCKS, Entry::decode(*v)),
                Chunk::Mixed(a) => {
                    for (j, &v) in a.iter().enumerate() {
                        push(base + j as u64, 1, Entry::decode(v));
                    }
                }
            }
        }
        out
    }

    /// First block at or after `l` (and before `end`) that is `Base`, skipping uniform chunks.
    pub fn next_base(&self, mut l: u64, end: u64) -> Option<u64> {
        while l < end {
            match self.chunks.get((l / CHUNK_BLOCKS) as usize) {
                None => return Some(l),
                Some(Chunk::Uniform(0)) => return Some(l),
                Some(Chunk::Uniform(_)) => l = (l / CHUNK_BLOCKS + 1) * CHUNK_BLOCKS,
                Some(Chunk::Mixed(a)) => {
                    if a[(l % CHUNK_BLOCKS) as usize] == 0 {
                        return Some(l);
                    }
                    l += 1;
                }
            }
        }
        None
    }

    /// First block at or after `l` (and before `end`) that is not `Base`, or `end`; skips
    /// uniform `Base` chunks.
    pub fn next_non_base(&self, mut l: u64, end: u64) -> u64 {
        while l < end {
            match self.chunks.get((l / CHUNK_BLOCKS) as usize) {
                None => return end,
                Some(Chunk::Uniform(0)) => l = (l / CHUNK_BLOCKS + 1) * CHUNK_BLOCKS,
                Some(Chunk::Uniform(_)) => return l,
                Some(Chunk::Mixed(a)) => {
                    if a[(l % CHUNK_BLOCKS) as usize] != 0 {
                        return l;
                    }
                    l += 1;
                }
            }
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_run_reports_replaced_data_blocks() {
        let mut m = BlockMap::new(2048);
        m.set_run(10, 3, Entry::Data(100), &mut |_| panic!("nothing replaced"));
        let mut old = Vec::new();
        m.set_run(0, 2048, Entry::Zero, &mut |p| old.push(p));
        old.sort();
        assert_eq!(old, vec![100, 101, 102]);
        assert_eq!(m.get(11), Entry::Zero);
        assert_eq!(m.runs(), vec![(0, 2048, Entry::Zero)]);
    }

    #[test]
    fn clone_is_unaffected_by_later_changes() {
        let mut m = BlockMap::new(1024);
        m.set_run(5, 1, Entry::Data(7), &mut |_| {});
        let snap = m.clone();
        m.set_run(5, 1, Entry::Data(8), &mut |_| {});
        assert_eq!(snap.get(5), Entry::Data(7));
        assert_eq!(m.get(5), Entry::Data(8));
    }

    #[test]
    fn runs_merge_consecutive_data_blocks() {
        let mut m = BlockMap::new(1024);
        m.set_run(510, 4, Entry::Data(20), &mut |_| {});
        assert_eq!(m.runs(), vec![(510, 4, Entry::Data(20))]);
        assert_eq!(m.next_base(509, 1024), Some(509));
        assert_eq!(m.next_base(510, 1024), Some(514));
    }
}
