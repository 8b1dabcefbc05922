//! Landings: whole-block writes received straight into the overlay's data file.
//!
//! A large WRITE normally costs two copies on the server: socket → buffer, buffer → page
//! cache. When the data file lives on a memory file system, [`Overlay::landing`] instead
//! reserves fresh physical blocks, allocates them in the file and hands out their memory
//! ([`sys::FileMemory`]); the NBD server reads the payload from the socket straight into
//! it, and [`Landing::commit`] then points the logical blocks at the new physical ones with
//! the same journal records as any redirected write.
//!
//! Why always fresh blocks (redirect), never the blocks already mapped: receiving takes as
//! long as the client takes to send, and nothing may be locked meanwhile. Fresh blocks are
//! owned by the landing alone (reference count 0, not in the free set), so no snapshot,
//! revert, trim or release can see or reuse them; a client that stops half-way leaves
//! nothing behind (dropping the landing frees them); a concurrent write to the same range
//! is ordered by whichever commits last, as NBD allows. The blocks the range pointed to
//! before are released like those of any other redirected write (invariant 2).

use std::ptr::NonNull;
use std::sync::Arc;

use super::map::{Entry, BLOCK, MAX_PHYS};
use super::{Meta, Overlay, OverlayError, Record, Result};
use crate::sys::FILE_MEMORY_SEGMENT;

/// Largest landing (the NBD maximum payload).
pub const MAX_LANDING: u64 = 32 << 20;
/// How many of the lowest free blocks are searched for a contiguous run before the data
/// file grows instead.
const RUN_SCAN: usize = 512;
/// Blocks waiting for release after which a commit flushes, so that a stream of large
/// overwrites reuses its old blocks instead of growing the data file.
const RELEASE_AFTER_BLOCKS: usize = 4 * 1024;
/// See [`Meta::grow_limit`] (64 MiB).
const GROW_MIN_BLOCKS: u64 = 16 * 1024;

/// Fresh blocks reserved for one whole-block write, and their memory. See the module docs.
pub struct Landing {
    overlay: Arc<Overlay>,
    offset: u64,
    len: usize,
    /// Physical block of each logical block of the range, in order.
    blocks: Vec<u32>,
    /// The blocks' memory: `(start, bytes)` pieces, in payload order.
    pieces: Vec<(NonNull<u8>, usize)>,
    /// Blocks `..logged` are referenced by logged records and no longer ours to free.
    logged: usize,
}

// SAFETY: the pieces point into the data file's shared mapping, which lives as long as the
// overlay (`overlay` is held); the blocks behind them belong to this landing alone until
// commit (module docs), so moving it to another thread shares nothing.
unsafe impl Send for Landing {}

/// The start of the first run of `n` consecutive blocks among the first [`RUN_SCAN`] of
/// `blocks` (ascending, or descending when `desc`).
fn find_run(blocks: impl Iterator<Item = u32>, n: usize, desc: bool) -> Option<u32> {
    let mut run_start = 0u32;
    let mut run_len = 0usize;
    let mut prev: Option<u32> = None;
    for p in blocks.take(RUN_SCAN) {
        let next = if desc {
            p.checked_add(1)
        } else {
            p.checked_sub(1)
        };
        if prev.is_some() && prev == next {
            run_len += 1;
        } else {
            run_start = p;
            run_len = 1;
        }
        prev = Some(p);
        if run_len == n {
            // Descending, the run's first block is the last one seen.
            return Some(if desc { p } else { run_start });
        }
    }
    None
}

impl Meta {
    /// How far the data file may grow for landings: twice the blocks in use (at least
    /// [`GROW_MIN_BLOCKS`] more than them). The free blocks below are mostly punched holes
    /// (see [`Meta::spare_max`]), so this costs address space, not storage.
    fn grow_limit(&self) -> u64 {
        (2 * self.in_use)
            .max(self.in_use + GROW_MIN_BLOCKS)
            .min(MAX_PHYS as u64)
    }

    /// Reserve `n` physical blocks for a landing: a contiguous run among the highest
    /// spares or the lowest free blocks; else a run at the end of the file, while the file is within
    /// [`Meta::grow_limit`] (or fewer than `n` blocks are free); else the lowest free
    /// blocks, wherever they are. Also says, per block, whether it is a spare (still
    /// allocated in the file).
    ///
    /// Why grow: a volume written at random has its blocks scattered, and a sequential
    /// overwrite landing in blocks freed one by one would scatter again. Growing keeps
    /// a sequential overwrite contiguous; once it has moved all of a region, the region it
    /// left is free and contiguous for the next pass.
    fn alloc_landing(&mut self, n: usize) -> Result<(Vec<u32>, Vec<bool>)> {
        // A run among the highest spares (blocks just freed by earlier landings: allocated
        // and mapped, so nothing to fault), else among the lowest free blocks.
        let found = find_run(self.spare.iter().rev().copied(), n, true)
            .or_else(|| find_run(self.free.iter().copied(), n, false));
        let blocks: Vec<u32> = match found {
            Some(start) => {
                let run: Vec<u32> = (start..start + n as u32).collect();
                for p in &run {
                    self.free.remove(p);
                }
                run
            }
            None if self.free.len() < n || self.hwm as u64 + n as u64 <= self.grow_limit() => {
                let start = self.hwm;
                self.hwm += n as u32;
                if self.refcount.len() < self.hwm as usize {
                    self.refcount.resize(self.hwm as usize, 0);
                }
                return Ok(((start..start + n as u32).collect(), vec![false; n]));
            }
            None => {
                // `alloc` takes spares out of `spare`: note them first.
                let backed: Vec<bool> = self
                    .free
                    .iter()
                    .take(n)
                    .map(|p| self.spare.contains(p))
                    .collect();
                let blocks = self.alloc(n)?;
                return Ok((blocks, backed));
            }
        };
        let backed = blocks.iter().map(|p| self.spare.remove(p)).collect();
        Ok((blocks, backed))
    }
}

impl Overlay {
    /// A landing for a write of `len` bytes at `offset`, or `None` when this overlay cannot
    /// take one: its data file is not on a memory file system, the range is not whole
    /// blocks, or it is longer than [`MAX_LANDING`]. Errors: out of range, no space (the
    /// file system is full), a failed overlay.
    pub fn landing(self: &Arc<Self>, offset: u64, len: u64) -> Result<Option<Landing>> {
        let Some(mem) = self.data.memory() else {
            return Ok(None);
        };
        if len == 0 || len > MAX_LANDING || offset % BLOCK != 0 || len % BLOCK != 0 {
            return Ok(None);
        }
        self.check_ok()?;
        let n = (len / BLOCK) as usize;
        let (blocks, backed) = {
            let mut meta = self.meta.lock();
            meta.check_range(offset, len)?;
            meta.alloc_landing(n)?
        };
        let mut landing = Landing {
            overlay: self.clone(),
            offset,
            len: len as usize,
            blocks,
            pieces: Vec::new(),
            logged: 0,
        };
        // Map the blocks piece by piece (a piece is contiguous in the file and never
        // crosses a mapping segment), allocating in the file those that are not spares.
        // On error, dropping the landing frees the blocks.
        let io = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::ENOSPC | libc::ENOMEM | libc::EFAULT) => OverlayError::NoSpace,
            _ => OverlayError::Io {
                context: "preparing overlay blocks for a write",
                source: e,
            },
        };
        let mut i = 0;
        while i < n {
            let first = landing.blocks[i];
            let mut k = 1;
            while i + k < n
                && landing.blocks[i + k] == first + k as u32
                && (first as u64 + k as u64) * BLOCK % FILE_MEMORY_SEGMENT != 0
            {
                k += 1;
            }
            let (at, bytes) = (first as u64 * BLOCK, k as u64 * BLOCK);
            if !backed[i..i + k].iter().all(|&b| b) {
                mem.allocate(at, bytes).map_err(io)?;
            }
            let ptr = mem.map(at, bytes).map_err(io)?;
            landing.pieces.push((ptr, bytes as usize));
            i += k;
        }
        Ok(Some(landing))
    }
}

impl Landing {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty (never: landings are at least one block).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where payload bytes from `filled` on go, up to the end of the piece holding byte
    /// `filled`; empty once `filled == len`.
    pub fn room(&mut self, filled: usize) -> &mut [u8] {
        let mut at = filled;
        for &(p, n) in &self.pieces {
            if at < n {
                // SAFETY: `p .. p+n` is memory of blocks this landing owns (module docs),
                // mapped for the life of `self.overlay`; `&mut self` makes this the only
                // live reference into the landing's memory.
                return unsafe { std::slice::from_raw_parts_mut(p.as_ptr().add(at), n - at) };
            }
            at -= n;
        }
        &mut []
    }

    /// Where payload bytes from `filled` on go, as up to `max` slices in payload order
    /// (none once `filled == len`).
    pub fn rooms(&mut self, filled: usize, max: usize) -> Vec<std::io::IoSliceMut<'_>> {
        let mut out = Vec::new();
        let mut at = filled;
        for &(p, n) in &self.pieces {
            if out.len() == max {
                break;
            }
            if at >= n {
                at -= n;
                continue;
            }
            // SAFETY: as in `room`; the pieces are disjoint, and every slice borrows
            // `self` mutably, so none outlives or aliases another reference into them.
            let s = unsafe { std::slice::from_raw_parts_mut(p.as_ptr().add(at), n - at) };
            out.push(std::io::IoSliceMut::new(s));
            at = 0;
        }
        out
    }

    /// Point the range at the received blocks. Like [`Overlay::write`]: in the storage's
    /// cache when it returns, durable after a later flush, or now with `fua`.
    pub fn commit(mut self, fua: bool) -> Result<()> {
        let ov = self.overlay.clone();
        ov.check_ok()?;
        let first = self.offset / BLOCK;
        let last = first + self.blocks.len() as u64 - 1;
        let pending = {
            // Stripes: serialise with writes that picked their targets before this commit
            // and have not logged yet (invariant 4).
            let _stripes = ov.lock_stripes(first, last);
            let _gate = ov.gate.read();
            let mut meta = ov.meta.lock();
            meta.check_range(self.offset, self.len as u64)?;
            let n = self.blocks.len();
            while self.logged < n {
                let i = self.logged;
                let mut k = 1;
                while i + k < n && self.blocks[i + k] == self.blocks[i] + k as u32 {
                    k += 1;
                }
                meta.log(Record::SetRun {
                    l: first + i as u64,
                    count: k as u64,
                    first: Entry::Data(self.blocks[i]),
                })?;
                self.logged += k;
            }
            (
                meta.pending.len(),
                // Only when the release can happen (no snapshot view or clone pins it).
                meta.pins == 0 && meta.deferred.len() >= RELEASE_AFTER_BLOCKS,
            )
        };
        let (pending, release_due) = pending;
        ov.after_change(fua || release_due, pending)
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        if self.logged < self.blocks.len() {
            // Never referenced: free at once.
            let mut meta = self.overlay.meta.lock();
            meta.free.extend(self.blocks[self.logged..].iter().copied());
        }
    }
}

impl crate::device::Landing for Landing {
    fn room(&mut self, filled: usize) -> &mut [u8] {
        Landing::room(self, filled)
    }

    fn rooms(&mut self, filled: usize, max: usize) -> Vec<std::io::IoSliceMut<'_>> {
        Landing::rooms(self, filled, max)
    }

    fn commit(self: Box<Self>, fua: bool) -> std::io::Result<()> {
        Landing::commit(*self, fua).map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = BLOCK as usize;

    /// An overlay on a memory file system (landings exist only there), or `None` when this
    /// machine has no /dev/shm.
    fn shm_overlay(blocks: usize) -> Option<(tempfile::TempDir, Arc<Overlay>, Vec<u8>)> {
        let dir = tempfile::tempdir_in("/dev/shm").ok()?;
        let base: Vec<u8> = (0..blocks * B).map(|i| (i % 251) as u8 + 1).collect();
        let ov = Overlay::create_dir(
            &dir.path().join("ov"),
            (blocks * B) as u64,
            base.len() as u64,
        )
        .unwrap();
        Some((dir, Arc::new(ov), base))
    }

    #[allow(clippy::ptr_arg)]
    fn read(ov: &Overlay, base: &Vec<u8>, off: usize, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        ov.read(off as u64, &mut b, base).unwrap();
        b
    }

    fn fill(l: &mut Landing, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let room = l.room(done);
            let k = room.len().min(data.len() - done);
            room[..k].copy_from_slice(&data[done..done + k]);
            done += k;
        }
        assert!(l.room(done).is_empty());
    }

    #[test]
    fn committed_landing_reads_back_and_survives_reopen() {
        let Some((dir, ov, base)) = shm_overlay(64) else {
            return;
        };
        let data: Vec<u8> = (0..16 * B).map(|i| (i * 7 % 253) as u8).collect();
        let mut l = ov
            .landing(8 * B as u64, data.len() as u64)
            .unwrap()
            .unwrap();
        fill(&mut l, &data);
        l.commit(true).unwrap();
        assert_eq!(read(&ov, &base, 8 * B, 16 * B), data);
        assert_eq!(read(&ov, &base, 0, 8 * B), base[..8 * B]);
        drop(ov);
        let ov = Overlay::open_dir(&dir.path().join("ov")).unwrap();
        assert_eq!(read(&ov, &base, 8 * B, 16 * B), data);
    }

    #[test]
    fn dropped_landing_writes_nothing_and_frees_its_blocks() {
        let Some((_dir, ov, base)) = shm_overlay(64) else {
            return;
        };
        ov.write(0, &vec![9u8; 4 * B], false, &base).unwrap();
        let before = ov.allocated_bytes();
        let mut l = ov.landing(0, 4 * B as u64).unwrap().unwrap();
        fill(&mut l, &vec![1u8; 4 * B]);
        drop(l);
        assert_eq!(read(&ov, &base, 0, 4 * B), vec![9u8; 4 * B]);
        assert_eq!(ov.allocated_bytes(), before);
        // The freed blocks are taken again by the next landing.
        let l = ov.landing(32 * B as u64, 4 * B as u64).unwrap().unwrap();
        assert_eq!(l.len(), 4 * B);
    }

    #[test]
    fn snapshot_taken_while_a_landing_is_filled_keeps_the_old_content() {
        let Some((_dir, ov, base)) = shm_overlay(64) else {
            return;
        };
        ov.write(0, &vec![5u8; 8 * B], false, &base).unwrap();
        let mut l = ov.landing(0, 8 * B as u64).unwrap().unwrap();
        let mut done = 0;
        while done < 4 * B {
            let room = l.room(done);
            let k = room.len().min(4 * B - done);
            room[..k].fill(6);
            done += k;
        }
        ov.snapshot("s").unwrap();
        while done < 8 * B {
            let room = l.room(done);
            let k = room.len().min(8 * B - done);
            room[..k].fill(6);
            done += k;
        }
        l.commit(false).unwrap();
        assert_eq!(read(&ov, &base, 0, 8 * B), vec![6u8; 8 * B]);
        ov.revert("s").unwrap();
        assert_eq!(read(&ov, &base, 0, 8 * B), vec![5u8; 8 * B]);
    }

    #[test]
    fn unaligned_or_out_of_range_requests_get_no_landing() {
        let Some((_dir, ov, _base)) = shm_overlay(16) else {
            return;
        };
        assert!(ov.landing(1, B as u64).unwrap().is_none());
        assert!(ov.landing(0, B as u64 + 1).unwrap().is_none());
        assert!(ov.landing(0, 0).unwrap().is_none());
        assert!(matches!(
            ov.landing(15 * B as u64, 2 * B as u64),
            Err(OverlayError::OutOfRange { .. })
        ));
    }

    #[test]
    fn many_overwrites_reuse_blocks_instead_of_growing_without_bound() {
        let Some((_dir, ov, base)) = shm_overlay(1024) else {
            return;
        };
        let chunk = 64 * B;
        for round in 0..40u8 {
            for off in (0..1024 * B).step_by(chunk) {
                let mut l = ov.landing(off as u64, chunk as u64).unwrap().unwrap();
                fill(&mut l, &vec![round; chunk]);
                l.commit(false).unwrap();
            }
        }
        ov.flush().unwrap();
        assert_eq!(read(&ov, &base, 0, 1024 * B), vec![39u8; 1024 * B]);
        assert_eq!(ov.allocated_bytes(), 1024 * BLOCK);
        let hwm = ov.meta.lock().hwm as u64;
        assert!(
            hwm <= 2 * 1024 + GROW_MIN_BLOCKS + 64,
            "data file grew to {hwm} blocks for 1024 in use"
        );
    }

    #[test]
    fn scattered_free_blocks_are_received_into_with_vectored_rooms() {
        let Some((_dir, ov, base)) = shm_overlay(256) else {
            return;
        };
        {
            let mut m = ov.meta.lock();
            // Pretend the file is at its growth limit with every other block free.
            m.hwm = 4 * 1024 * 1024;
            m.in_use = 1;
            let hwm = m.hwm as usize;
            m.refcount.resize(hwm, 1);
            for p in (0..64u32).step_by(2) {
                m.refcount[p as usize] = 0;
                m.free.insert(p);
            }
        }
        let data: Vec<u8> = (0..16 * B).map(|i| (i % 241) as u8).collect();
        let mut l = ov.landing(0, 16 * B as u64).unwrap().unwrap();
        let rooms = l.rooms(0, 64);
        assert_eq!(rooms.len(), 16, "scattered blocks give one slice each");
        drop(rooms);
        fill(&mut l, &data);
        l.commit(false).unwrap();
        assert_eq!(read(&ov, &base, 0, 16 * B), data);
    }
}
