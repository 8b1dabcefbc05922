//! The copy-on-write overlay of a volume: the on-disk layer that holds a VM's writes over a
//! read-only base image, with crash-safe metadata and snapshots.
//!
//! Main types: [`Overlay`] (one overlay, shared by reference between I/O threads),
//! [`Mapping`] (the answer to "where do these bytes live?"), [`ReadPlan`] (mappings plus the
//! guarantee that the overlay blocks they name stay valid while it lives), the storage traits
//! in [`storage`] and the crash simulator in [`sim`]. [`volume::OverlayVolume`] serves an
//! overlay plus its base as a [`crate::device::BlockDevice`]; [`SnapshotView`] reads one
//! snapshot in place (and [`volume::SnapshotVolume`] serves it, read-only).
//!
//! Design (byte layouts in `docs/overlay-format.md`):
//! - 4 KiB blocks. Every logical block is `Base` (read the base), `Zero` (reads zeros, never
//!   the base) or `Data(p)` (physical block `p` of the `data` file). One merged block map per
//!   volume; snapshots are frozen clones sharing chunks and physical blocks, so reads cost the
//!   same whatever the number of snapshots.
//! - Physical blocks carry a reference count (current map + snapshots). A write to a block
//!   referenced only by the current map overwrites it in place; otherwise it goes to a newly
//!   allocated block (redirect-on-write). The base is never written.
//! - Map changes are journal records kept in memory and appended in batches on `flush` (also
//!   on FUA and when many are pending): `data` is `fdatasync`'d first, then the batch is
//!   written to `journal` and `fdatasync`'d. Records are checksummed and carry a generation
//!   and a sequence number; replay stops at the first record that does not verify.
//! - A checkpoint (the full maps) is written when the journal grows large and at every open,
//!   to the checkpoint file not in use, then a superblock slot naming it; each open starts a
//!   new journal generation so stale records past a torn tail can never be replayed.
//!
//! Invariants that make crashes safe:
//! 1. A record is written to the journal only after the data it points to was synced.
//! 2. A reference count is decremented (and the block may be reused, punched or overwritten
//!    in place) only once the record that dropped the reference is durable. Until then the
//!    block keeps its count, so in-place overwrites and reuse can never touch a block that
//!    durable metadata (the current map or a snapshot) still points to.
//! 3. Reads and writes hold the shared side of `gate` while they use physical block numbers;
//!    blocks become reusable, and snapshots freeze the map, only under its exclusive side.
//! 4. All changes to one logical block are serialised by its stripe lock (unaligned
//!    read-modify-write of neighbouring sectors cannot lose either write).

pub mod format;
pub mod harness;
pub mod landing;
pub mod map;
pub mod sim;
pub mod storage;
pub mod view;
pub mod volume;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::error::{Classify, ErrorKind};
use format::{Checkpoint, Record, StoredMap, Superblock, MAX_SNAPSHOT_NAME, SUPER_SLOT_LEN};
use map::{BlockMap, Entry, BLOCK, MAX_PHYS};
use storage::{DirStorage, OverlayFile, OverlayStorage};
pub use view::SnapshotView;

/// Largest virtual size an overlay supports (64 TiB).
pub const MAX_SIZE: u64 = 1 << 46;
/// Journal size past which `flush` writes a checkpoint and starts a new journal.
const JOURNAL_CHECKPOINT_BYTES: u64 = 64 << 20;
/// Pending (unflushed) records past which a write flushes by itself.
const WRITEBACK_RECORDS: usize = 16 * 1024;
const STRIPES: usize = 1024;
/// Free blocks kept allocated (not punched) at least, for reuse by the next writes.
const SPARE_MIN_BLOCKS: usize = 8 * 1024;
/// Spare runs shorter than this are not punched (see [`Meta::take_punch`]).
const PUNCH_RUN_MIN: usize = 16;
/// Blocks per stripe lock.
const STRIPE_GROUP: u64 = 16;

const F_SUPER: &str = "super";
const F_CKPT: [&str; 2] = ["ckpt.0", "ckpt.1"];
const F_JOURNAL: &str = "journal";
const F_DATA: &str = "data";

/// Errors of the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay i/o error: {context}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading the base image failed")]
    Base(#[source] io::Error),
    #[error("no overlay here (no valid superblock)")]
    NotFound,
    #[error("an overlay exists here already")]
    AlreadyExists,
    #[error("overlay metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("overlay format version {0} is newer than this imgcache supports")]
    UnsupportedVersion(u32),
    #[error("range {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid size {0}: must be 1 byte ..= 64 TiB")]
    InvalidSize(u64),
    #[error("cannot shrink from {current} to {requested} bytes: overlays only grow")]
    Shrink { current: u64, requested: u64 },
    #[error("hydrate range must start on a 4096-byte block and cover whole blocks")]
    Unaligned,
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0:?} exists already")]
    SnapshotExists(String),
    #[error("invalid snapshot name {0:?}: use 1 to 255 bytes")]
    InvalidName(String),
    #[error("the overlay data file is full")]
    NoSpace,
    #[error("the overlay failed to persist metadata earlier; reopen it")]
    Failed,
}

impl Classify for OverlayError {
    fn kind(&self) -> ErrorKind {
        match self {
            OverlayError::Io { source, .. } | OverlayError::Base(source) => {
                ErrorKind::of_io(source)
            }
            OverlayError::NotFound | OverlayError::SnapshotNotFound(_) => ErrorKind::NotFound,
            OverlayError::AlreadyExists | OverlayError::SnapshotExists(_) => {
                ErrorKind::AlreadyExists
            }
            OverlayError::Corrupt(_) => ErrorKind::Corrupt,
            OverlayError::UnsupportedVersion(_) => ErrorKind::Conflict,
            OverlayError::OutOfRange { .. }
            | OverlayError::InvalidSize(_)
            | OverlayError::Shrink { .. }
            | OverlayError::Unaligned
            | OverlayError::InvalidName(_) => ErrorKind::InvalidInput,
            OverlayError::NoSpace => ErrorKind::NoSpace,
            OverlayError::Failed => ErrorKind::Io,
        }
    }
}

impl From<OverlayError> for io::Error {
    fn from(e: OverlayError) -> io::Error {
        match e {
            OverlayError::Io { source, .. } | OverlayError::Base(source) => source,
            other => {
                let errno = other.kind().errno();
                io::Error::new(io::Error::from_raw_os_error(errno).kind(), other)
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, OverlayError>;

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> OverlayError {
    move |source| OverlayError::Io { context, source }
}

/// Where a piece of a read comes from. `offset` is the logical (device) offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// In the overlay's data file at `phys_off`.
    Overlay {
        offset: u64,
        phys_off: u64,
        len: u64,
    },
    /// In the base image at the same offset.
    Base { offset: u64, len: u64 },
    /// Zeros (trimmed, zeroed, or past the end of the base).
    Zero { offset: u64, len: u64 },
}

impl Mapping {
    pub fn offset(&self) -> u64 {
        match *self {
            Mapping::Overlay { offset, .. }
            | Mapping::Base { offset, .. }
            | Mapping::Zero { offset, .. } => offset,
        }
    }
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::Overlay { len, .. }
            | Mapping::Base { len, .. }
            | Mapping::Zero { len, .. } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Synchronous access to the base image, for read-modify-write of partly written blocks.
///
/// The overlay only asks for bytes below its `base_len` and never writes the base.
pub trait BaseRead {
    /// Fill `buf` with the base's bytes at `offset` (whole buffer, or an error).
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A base held in memory (tests, tools).
impl BaseRead for Vec<u8> {
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self[..].read_base(offset, buf)
    }
}

/// A base held in memory (tests, tools).
impl BaseRead for [u8] {
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start + buf.len();
        if end > self.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// Virtual size of the volume when the snapshot was taken.
    pub size: u64,
}

#[derive(Clone)]
struct Snap {
    size: u64,
    map: BlockMap,
}

/// In-memory metadata, under `Overlay::meta`.
struct Meta {
    size: u64,
    base_len: u64,
    current: BlockMap,
    snapshots: BTreeMap<String, Snap>,
    /// References to each physical block (current map, snapshots, and references dropped by
    /// records not yet durable). Index = physical block.
    refcount: Vec<u16>,
    /// Blocks below `hwm` with no reference, durably so: free to allocate.
    free: BTreeSet<u32>,
    /// Free blocks released without punching a hole, so their memory (on a memory file
    /// system) stays allocated and mapped for the next write: a subset of `free`, at most
    /// [`Meta::spare_max`] long; the highest are punched first.
    spare: BTreeSet<u32>,
    /// Physical blocks `0..hwm` have been handed out at some time.
    hwm: u32,
    /// Blocks with a non-zero count.
    in_use: u64,
    next_seq: u64,
    /// Records not yet in the journal, with their sequence numbers.
    pending: Vec<(u64, Record)>,
    /// Decrements waiting for the record (sequence number) that caused them to be durable.
    deferred: VecDeque<(u64, u32)>,
    /// While non-zero, no reference count is decremented, so no block is freed, reused or
    /// overwritten in place: a clone or a [`SnapshotView`] is reading blocks without the gate.
    pins: usize,
    /// While loading (replay), reference counting is off; counts are rebuilt afterwards.
    loading: bool,
}

impl Meta {
    fn empty(size: u64, base_len: u64) -> Meta {
        Meta {
            size,
            base_len,
            current: BlockMap::new(size.div_ceil(BLOCK)),
            snapshots: BTreeMap::new(),
            refcount: Vec::new(),
            free: BTreeSet::new(),
            spare: BTreeSet::new(),
            hwm: 0,
            in_use: 0,
            next_seq: 1,
            pending: Vec::new(),
            deferred: VecDeque::new(),
            pins: 0,
            loading: false,
        }
    }

    fn incref(&mut self, p: u32) {
        if self.loading {
            return;
        }
        let rc = &mut self.refcount[p as usize];
        if *rc == 0 {
            self.in_use += 1;
        }
        *rc = rc
            .checked_add(1)
            .expect("more than 65535 references to one block");
    }

    /// Apply one record to the maps. Used live (with reference counting) and by replay.
    fn apply(&mut self, seq: u64, rec: &Record) -> Result<()> {
        match rec {
            Record::SetRun { l, count, first } => {
                if l.checked_add(*count)
                    .is_none_or(|e| e > self.size.div_ceil(BLOCK))
                {
                    return Err(OverlayError::Corrupt(format!(
                        "record {seq} maps blocks past the end"
                    )));
                }
                let Meta {
                    current,
                    deferred,
                    loading,
                    ..
                } = self;
                current.set_run(*l, *count, *first, &mut |p| {
                    if !*loading {
                        deferred.push_back((seq, p));
                    }
                });
                if let Entry::Data(p) = first {
                    for i in 0..*count {
                        self.incref(p + i as u32);
                    }
                }
            }
            Record::Snapshot(name) => {
                if self.snapshots.contains_key(name) {
                    return Err(OverlayError::SnapshotExists(name.clone()));
                }
                let snap = Snap {
                    size: self.size,
                    map: self.current.clone(),
                };
                if !self.loading {
                    snap.map.for_each_data(&mut |_, p| self.incref(p));
                }
                self.snapshots.insert(name.clone(), snap);
            }
            Record::DeleteSnapshot(name) => {
                let snap = self
                    .snapshots
                    .remove(name)
                    .ok_or_else(|| OverlayError::SnapshotNotFound(name.clone()))?;
                if !self.loading {
                    snap.map
                        .for_each_data(&mut |_, p| self.deferred.push_back((seq, p)));
                }
            }
            Record::Revert(name) => {
                let snap = self
                    .snapshots
                    .get(name)
                    .ok_or_else(|| OverlayError::SnapshotNotFound(name.clone()))?
                    .clone();
                let old = std::mem::replace(&mut self.current, snap.map);
                self.size = snap.size;
                if !self.loading {
                    let cur = self.current.clone();
                    cur.for_each_data(&mut |_, p| self.incref(p));
                    old.for_each_data(&mut |_, p| self.deferred.push_back((seq, p)));
                }
            }
            Record::Resize(size) => {
                if *size < self.size || *size > MAX_SIZE {
                    return Err(OverlayError::Corrupt(format!("record {seq}: bad resize")));
                }
                self.size = *size;
                self.current.grow(size.div_ceil(BLOCK));
            }
        }
        Ok(())
    }

    /// Apply a new record and queue it for the journal.
    fn log(&mut self, rec: Record) -> Result<u64> {
        let seq = self.next_seq;
        self.apply(seq, &rec)?;
        self.next_seq += 1;
        self.pending.push((seq, rec));
        Ok(seq)
    }

    /// Reserve `n` physical blocks (count 0, not free), lowest free first.
    fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.free.pop_first() {
                Some(p) => {
                    self.spare.remove(&p);
                    out.push(p)
                }
                None => break,
            }
        }
        let rest = (n - out.len()) as u64;
        if self.hwm as u64 + rest > MAX_PHYS as u64 {
            self.free.extend(out);
            return Err(OverlayError::NoSpace);
        }
        for _ in 0..rest {
            out.push(self.hwm);
            self.hwm += 1;
        }
        if self.refcount.len() < self.hwm as usize {
            self.refcount.resize(self.hwm as usize, 0);
        }
        Ok(out)
    }

    /// Apply the decrements whose records are durable up to `durable_seq`; returns blocks
    /// whose count reached zero (not yet in `free`).
    fn take_released(&mut self, durable_seq: u64) -> Vec<u32> {
        let mut out = Vec::new();
        if self.pins > 0 {
            return out;
        }
        while let Some(&(seq, p)) = self.deferred.front() {
            if seq > durable_seq {
                break;
            }
            self.deferred.pop_front();
            let rc = &mut self.refcount[p as usize];
            *rc -= 1;
            if *rc == 0 {
                self.in_use -= 1;
                out.push(p);
            }
        }
        out
    }

    /// Rebuild reference counts and the free set from the maps, `data_blocks` being the
    /// data file's length in blocks.
    fn rebuild_counts(&mut self, data_blocks: u64) {
        let mut maxp: u64 = data_blocks;
        let mut rc: Vec<u16> = Vec::new();
        let mut count = |p: u32| {
            if rc.len() <= p as usize {
                rc.resize(p as usize + 1, 0);
            }
            rc[p as usize] += 1;
        };
        self.current.for_each_data(&mut |_, p| count(p));
        for s in self.snapshots.values() {
            s.map.for_each_data(&mut |_, p| count(p));
        }
        maxp = maxp.max(rc.len() as u64);
        rc.resize(maxp as usize, 0);
        self.hwm = maxp as u32;
        self.in_use = rc.iter().filter(|&&c| c > 0).count() as u64;
        self.free = (0..self.hwm).filter(|&p| rc[p as usize] == 0).collect();
        self.spare.clear();
        self.refcount = rc;
        self.deferred.clear();
        self.loading = false;
    }

    /// Take spares to punch out of `spare` (they stay free), so that at most
    /// [`Meta::spare_max`] remain: runs of at least [`PUNCH_RUN_MIN`] blocks, the lowest
    /// first (landings reuse the highest); single blocks and short runs only when over four times the allowance (one
    /// hole-punching call per block costs more than the memory is worth, and the
    /// neighbours of a freed block are often freed soon after).
    fn take_punch(&mut self) -> Vec<u32> {
        let keep = self.spare_max();
        let Some(mut excess) = self.spare.len().checked_sub(keep).filter(|&e| e > 0) else {
            return Vec::new();
        };
        let any = self.spare.len() > 4 * keep;
        let mut out = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        let take = |run: &mut Vec<u32>, out: &mut Vec<u32>, excess: &mut usize| {
            if any || run.len() >= PUNCH_RUN_MIN {
                *excess = excess.saturating_sub(run.len());
                out.append(run);
            }
            run.clear();
        };
        for &p in self.spare.iter() {
            if excess == 0 {
                break;
            }
            if run.last().is_some_and(|&q| q + 1 != p) {
                take(&mut run, &mut out, &mut excess);
            }
            run.push(p);
        }
        if excess > 0 {
            take(&mut run, &mut out, &mut excess);
        }
        for p in &out {
            self.spare.remove(p);
        }
        out
    }

    /// Free blocks kept allocated for reuse: [`SPARE_MIN_BLOCKS`] or an eighth of the
    /// blocks in use, whichever is more.
    fn spare_max(&self) -> usize {
        SPARE_MIN_BLOCKS.max((self.in_use / 8) as usize)
    }

    /// Whether logical block `l` reads the base in the current map or in any snapshot.
    fn reads_base(&self, l: u64) -> bool {
        self.current.get(l) == Entry::Base
            || self.snapshots.values().any(|s| s.map.get(l) == Entry::Base)
    }

    /// The first range of blocks at or after `offset` (and below `end`, a byte offset at most
    /// `base_len`) that reads the base in some map, clipped to `offset .. end` and to
    /// `max_len` bytes (rounded up to whole blocks).
    fn next_base_range(&self, offset: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        let end_block = end.div_ceil(BLOCK);
        let first = offset / BLOCK;
        let maps = || std::iter::once(&self.current).chain(self.snapshots.values().map(|s| &s.map));
        let s = maps().filter_map(|m| m.next_base(first, end_block)).min()?;
        let cap = s.saturating_add(max_len.div_ceil(BLOCK)).min(end_block);
        // The run ends at the first block where no map reads the base: move to the furthest
        // "next non-Base block" of all maps until every map agrees (uniform chunks skip fast).
        let mut e = s + 1;
        loop {
            let next = maps().map(|m| m.next_non_base(e, cap)).max().unwrap_or(cap);
            if next == e {
                break;
            }
            e = next;
        }
        let so = (s * BLOCK).max(offset);
        let eo = (e * BLOCK).min(end);
        Some((so, eo - so))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(OverlayError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

/// State owned by whoever is flushing.
struct FlushState {
    /// Generation of the superblock in force; journal records carry it.
    generation: u64,
    /// Where the next journal batch goes.
    tail: u64,
}

/// Unpins blocks when a clone finishes (or fails).
struct PinGuard<'a>(&'a Mutex<Meta>);

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().pins -= 1;
    }
}

/// The mappings of a read range, and a guard: while a `ReadPlan` lives, the overlay blocks it
/// names are not reused, so reading them gives this range's data (or, for a block trimmed
/// concurrently, zeros).
///
/// Do not call other methods of the overlay while holding a plan (it holds a shared lock
/// that snapshot operations and flushes wait for).
pub struct ReadPlan<'a> {
    overlay: &'a Overlay,
    _gate: RwLockReadGuard<'a, ()>,
    mappings: Vec<Mapping>,
}

impl ReadPlan<'_> {
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Read overlay bytes at `phys_off` (from a [`Mapping::Overlay`]), blocking.
    pub fn read_overlay(&self, phys_off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.overlay.data.read_at(buf, phys_off)
    }

    /// As [`Self::read_overlay`] without blocking; `None` if it would block.
    pub fn read_overlay_nowait(&self, phys_off: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.overlay.data.read_nowait(buf, phys_off)
    }
}

/// One copy-on-write overlay. All methods take `&self` and may be called from many threads.
///
/// Durability contract: `write`, `write_zeroes` and `hydrate` return once their data is in the
/// storage's cache; they are durable after a later `flush` returns, or when they return if
/// called with `fua`. Snapshot operations and `resize` are durable when they return. A
/// process crash (page cache survives) keeps everything flushed; a power loss keeps
/// everything flushed and never shows a block content that was never written to it.
/// Dropping an `Overlay` does not flush (it behaves like a crash); call [`Overlay::close`].
pub struct Overlay {
    data: Arc<dyn OverlayFile>,
    journal: Arc<dyn OverlayFile>,
    superf: Arc<dyn OverlayFile>,
    ckpt: [Arc<dyn OverlayFile>; 2],
    gate: RwLock<()>,
    stripes: Box<[Mutex<()>]>,
    meta: Mutex<Meta>,
    flush: Mutex<FlushState>,
    failed: AtomicBool,
    journal_limit: AtomicU64,
}

impl Overlay {
    /// Create an empty overlay in `storage` for a volume of `size` bytes whose base has
    /// `base_len` bytes (past it, unwritten blocks read as zeros). Durable when it returns.
    pub fn create(storage: Arc<dyn OverlayStorage>, size: u64, base_len: u64) -> Result<Overlay> {
        if size == 0 || size > MAX_SIZE {
            return Err(OverlayError::InvalidSize(size));
        }
        if storage
            .exists(F_SUPER)
            .map_err(io_err("checking for an overlay"))?
        {
            let f = storage
                .open(F_SUPER, false)
                .map_err(io_err("opening super"))?;
            if read_super(&*f)?.is_some() {
                return Err(OverlayError::AlreadyExists);
            }
        }
        let ov = Self::with_files(&*storage, Meta::empty(size, base_len.min(size)), 0)?;
        ov.checkpoint(&mut ov.flush.lock())?;
        Ok(ov)
    }

    /// Create an overlay in directory `dir` (created if missing).
    pub fn create_dir(dir: &std::path::Path, size: u64, base_len: u64) -> Result<Overlay> {
        let s = DirStorage::create_dir(dir).map_err(io_err("creating the overlay directory"))?;
        Self::create(Arc::new(s), size, base_len)
    }

    /// Open the overlay in directory `dir`.
    pub fn open_dir(dir: &std::path::Path) -> Result<Overlay> {
        Self::open(Arc::new(DirStorage::new(dir)))
    }

    fn with_files(storage: &dyn OverlayStorage, meta: Meta, generation: u64) -> Result<Overlay> {
        let open = |n: &str| {
            storage
                .open(n, true)
                .map_err(io_err("opening overlay files"))
        };
        Ok(Overlay {
            data: open(F_DATA)?,
            journal: open(F_JOURNAL)?,
            superf: open(F_SUPER)?,
            ckpt: [open(F_CKPT[0])?, open(F_CKPT[1])?],
            gate: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            meta: Mutex::new(meta),
            flush: Mutex::new(FlushState {
                generation,
                tail: 0,
            }),
            failed: AtomicBool::new(false),
            journal_limit: AtomicU64::new(JOURNAL_CHECKPOINT_BYTES),
        })
    }

    /// Open an existing overlay: load the newest checkpoint, replay the journal, and write a
    /// fresh checkpoint (so this session's journal starts clean).
    pub fn open(storage: Arc<dyn OverlayStorage>) -> Result<Overlay> {
        if !storage.exists(F_SUPER).map_err(io_err("opening super"))? {
            return Err(OverlayError::NotFound);
        }
        let superf = storage
            .open(F_SUPER, false)
            .map_err(io_err("opening super"))?;
        let sb = read_super(&*superf)?.ok_or(OverlayError::NotFound)?;
        let ckf = storage
            .open(F_CKPT[(sb.generation % 2) as usize], false)
            .map_err(io_err("opening the checkpoint"))?;
        if sb.ckpt_len > 1 << 40 {
            return Err(OverlayError::Corrupt("checkpoint length".into()));
        }
        let mut buf = vec![0u8; sb.ckpt_len as usize];
        ckf.read_at(&mut buf, 0)
            .map_err(io_err("reading the checkpoint"))?;
        if crc32fast::hash(&buf) != sb.ckpt_crc {
            return Err(OverlayError::Corrupt("checkpoint checksum".into()));
        }
        let ck = Checkpoint::decode(&buf)
            .ok_or_else(|| OverlayError::Corrupt("checkpoint layout".into()))?;
        if ck.generation != sb.generation {
            return Err(OverlayError::Corrupt("checkpoint generation".into()));
        }
        let mut meta = Meta::empty(ck.current.size, ck.base_len);
        meta.current = ck.current.map;
        meta.next_seq = ck.next_seq;
        meta.loading = true;
        for s in ck.snapshots {
            meta.snapshots.insert(
                s.name,
                Snap {
                    size: s.size,
                    map: s.map,
                },
            );
        }
        // Replay.
        let journal = storage
            .open(F_JOURNAL, true)
            .map_err(io_err("opening the journal"))?;
        let jlen = journal.len().map_err(io_err("reading the journal"))?;
        let mut jbuf = vec![0u8; jlen as usize];
        journal
            .read_at(&mut jbuf, 0)
            .map_err(io_err("reading the journal"))?;
        let mut pos = 0usize;
        while let Some((rec, n)) = Record::decode(&jbuf[pos..], sb.generation, meta.next_seq) {
            let seq = meta.next_seq;
            meta.apply(seq, &rec)?;
            meta.next_seq += 1;
            pos += n;
        }
        let ov = Self::with_files(&*storage, meta, sb.generation)?;
        let data_len = ov.data.len().map_err(io_err("reading the data file"))?;
        ov.meta.lock().rebuild_counts(data_len.div_ceil(BLOCK));
        ov.checkpoint(&mut ov.flush.lock())?;
        Ok(ov)
    }

    /// Flush and write a checkpoint, so the next open has no journal to replay.
    pub fn close(self) -> Result<()> {
        self.sync_all()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.lock().size
    }

    /// Bytes of the base image; unwritten blocks past it read as zeros.
    pub fn base_len(&self) -> u64 {
        self.meta.lock().base_len
    }

    /// Bytes of the data file in use (referenced by the volume or a snapshot).
    pub fn allocated_bytes(&self) -> u64 {
        self.meta.lock().in_use * BLOCK
    }

    /// Journal size past which a flush writes a checkpoint (tests use small values).
    #[doc(hidden)]
    pub fn set_journal_limit(&self, bytes: u64) {
        self.journal_limit.store(bytes, Ordering::Relaxed);
    }

    fn check_ok(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            Err(OverlayError::Failed)
        } else {
            Ok(())
        }
    }

    fn fail(&self, e: OverlayError) -> OverlayError {
        self.failed.store(true, Ordering::Release);
        e
    }

    fn lock_stripes(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        // One stripe per 64 KiB group of blocks, so a large write takes few locks and
        // neighbouring in-flight sequential writes do not share any.
        let (g0, g1) = (first / STRIPE_GROUP, last / STRIPE_GROUP);
        if g1 - g0 + 1 >= STRIPES as u64 {
            return self.stripes.iter().map(|m| m.lock()).collect();
        }
        let mut idx: Vec<usize> = (g0..=g1).map(|g| (g % STRIPES as u64) as usize).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.stripes[i].lock()).collect()
    }

    /// Where the bytes `offset .. offset+len` live, in order, adjacent pieces of the same kind
    /// merged. The returned plan keeps overlay blocks valid while it lives.
    pub fn map(&self, offset: u64, len: u64) -> Result<ReadPlan<'_>> {
        let gate = self.gate.read();
        let meta = self.meta.lock();
        meta.check_range(offset, len)?;
        let mappings = map_range(&meta.current, meta.base_len, offset, len);
        drop(meta);
        Ok(ReadPlan {
            overlay: self,
            _gate: gate,
            mappings,
        })
    }

    /// Read `buf.len()` bytes at `offset`, blocking; base pieces come from `base`.
    pub fn read(&self, offset: u64, buf: &mut [u8], base: &dyn BaseRead) -> Result<()> {
        let plan = self.map(offset, buf.len() as u64)?;
        for m in plan.mappings() {
            let s = (m.offset() - offset) as usize;
            let dst = &mut buf[s..s + m.len() as usize];
            match *m {
                Mapping::Overlay { phys_off, .. } => plan
                    .read_overlay(phys_off, dst)
                    .map_err(io_err("reading overlay data"))?,
                Mapping::Zero { .. } => dst.fill(0),
                Mapping::Base { offset, .. } => {
                    base.read_base(offset, dst).map_err(OverlayError::Base)?
                }
            }
        }
        Ok(())
    }

    /// Fill `buf` with the old content of block `l` in state `e` (caller holds the gate).
    fn read_block(&self, l: u64, e: Entry, base_buf: Option<&[u8]>, buf: &mut [u8]) -> Result<()> {
        match e {
            Entry::Data(p) => self
                .data
                .read_at(buf, p as u64 * BLOCK)
                .map_err(io_err("reading overlay data")),
            Entry::Zero => {
                buf.fill(0);
                Ok(())
            }
            Entry::Base => {
                match base_buf {
                    Some(b) => buf.copy_from_slice(b),
                    None => debug_assert!(false, "base block {l} not prefetched"),
                }
                Ok(())
            }
        }
    }

    /// Write `data` at `offset`. Partial blocks are read-modify-written (old content from the
    /// overlay, or from `base`). With `fua`, durable when it returns (a full flush).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool, base: &dyn BaseRead) -> Result<()> {
        self.check_ok()?;
        let pending = self.write_inner(offset, data, base)?;
        self.after_change(fua, pending)
    }

    fn after_change(&self, fua: bool, pending: usize) -> Result<()> {
        if fua || pending >= WRITEBACK_RECORDS {
            self.flush()?;
        }
        Ok(())
    }

    /// Returns the number of pending records afterwards.
    fn write_inner(&self, offset: u64, data: &[u8], base: &dyn BaseRead) -> Result<usize> {
        let len = data.len() as u64;
        self.meta.lock().check_range(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        let nblocks = (last - first + 1) as usize;
        let head_partial = offset % BLOCK != 0 || offset + len < (first + 1) * BLOCK;
        let tail_partial = last != first && (offset + len) % BLOCK != 0;
        let mut edges = Vec::with_capacity(2);
        if head_partial {
            edges.push(first);
        }
        if tail_partial {
            edges.push(last);
        }
        let _stripes = self.lock_stripes(first, last);
        loop {
            // Fetch base content of partial blocks outside the gate (a base read may be slow).
            let mut base_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
            for &l in &edges {
                let (e, base_len) = {
                    let m = self.meta.lock();
                    (m.current.get(l), m.base_len)
                };
                if e == Entry::Base {
                    let mut b = vec![0u8; BLOCK as usize];
                    let start = l * BLOCK;
                    let n = base_len.saturating_sub(start).min(BLOCK) as usize;
                    if n > 0 {
                        base.read_base(start, &mut b[..n])
                            .map_err(OverlayError::Base)?;
                    }
                    base_blocks.push((l, b));
                }
            }
            let gate = self.gate.read();
            let mut meta = self.meta.lock();
            meta.check_range(offset, len)?;
            // A revert may have changed an edge block since the base was read.
            let stale = edges.iter().any(|&l| {
                (meta.current.get(l) == Entry::Base) != base_blocks.iter().any(|(b, _)| *b == l)
            });
            if stale {
                continue;
            }
            let mut old = Vec::with_capacity(nblocks);
            let mut targets = Vec::with_capacity(nblocks);
            let mut new_count = 0;
            for l in first..=last {
                let e = meta.current.get(l);
                old.push(e);
                match e {
                    Entry::Data(p) if meta.refcount[p as usize] == 1 => targets.push(Some(p)),
                    _ => {
                        targets.push(None);
                        new_count += 1;
                    }
                }
            }
            let fresh = meta.alloc(new_count)?;
            drop(meta);
            let mut fresh_it = fresh.iter();
            let phys: Vec<u32> = targets
                .iter()
                .map(|t| t.unwrap_or_else(|| *fresh_it.next().expect("allocated")))
                .collect();

            let result = (|| -> Result<()> {
                let owned;
                let buf: &[u8] = if head_partial || tail_partial {
                    let mut b = vec![0u8; nblocks * BLOCK as usize];
                    for &l in &edges {
                        let i = (l - first) as usize;
                        let bb = base_blocks.iter().find(|(x, _)| *x == l).map(|x| &x.1[..]);
                        let dst = &mut b[i * BLOCK as usize..(i + 1) * BLOCK as usize];
                        self.read_block(l, old[i], bb, dst)?;
                    }
                    let s = (offset - first * BLOCK) as usize;
                    b[s..s + data.len()].copy_from_slice(data);
                    owned = b;
                    &owned
                } else {
                    data
                };
                let mut i = 0;
                while i < nblocks {
                    let mut n = 1;
                    while i + n < nblocks && phys[i + n] == phys[i] + n as u32 {
                        n += 1;
                    }
                    let b = BLOCK as usize;
                    self.data
                        .write_at(&buf[i * b..(i + n) * b], phys[i] as u64 * BLOCK)
                        .map_err(io_err("writing overlay data"))?;
                    i += n;
                }
                Ok(())
            })();

            let mut meta = self.meta.lock();
            if let Err(e) = result {
                meta.free.extend(fresh);
                return Err(e);
            }
            // Commit the redirected blocks as runs.
            let mut i = 0;
            while i < nblocks {
                if targets[i].is_some() {
                    i += 1;
                    continue;
                }
                let mut n = 1;
                while i + n < nblocks
                    && targets[i + n].is_none()
                    && phys[i + n] == phys[i] + n as u32
                {
                    n += 1;
                }
                meta.log(Record::SetRun {
                    l: first + i as u64,
                    count: n as u64,
                    first: Entry::Data(phys[i]),
                })?;
                i += n;
            }
            let pending = meta.pending.len();
            drop(meta);
            drop(gate);
            return Ok(pending);
        }
    }

    /// Make `offset .. offset+len` read as zeros, never from the base. Whole blocks become
    /// `Zero` (their overlay blocks are released once that is durable); partial blocks are
    /// read-modify-written. TRIM is the same operation.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        base: &dyn BaseRead,
    ) -> Result<()> {
        self.check_ok()?;
        self.meta.lock().check_range(offset, len)?;
        if len == 0 {
            return self.after_change(fua, 0);
        }
        let end = offset + len;
        let a = offset.div_ceil(BLOCK);
        let b = end / BLOCK;
        let mut pending = 0;
        let zeros = [0u8; BLOCK as usize];
        if a > b {
            // Inside one block.
            pending = self.write_inner(offset, &zeros[..len as usize], base)?;
        } else {
            if offset < a * BLOCK {
                pending =
                    self.write_inner(offset, &zeros[..(a * BLOCK - offset) as usize], base)?;
            }
            if end > b * BLOCK && b >= a {
                pending =
                    self.write_inner(b * BLOCK, &zeros[..(end - b * BLOCK) as usize], base)?;
            }
            if b > a {
                let _stripes = self.lock_stripes(a, b - 1);
                let _gate = self.gate.read();
                let mut meta = self.meta.lock();
                meta.check_range(offset, len)?;
                meta.log(Record::SetRun {
                    l: a,
                    count: b - a,
                    first: Entry::Zero,
                })?;
                pending = meta.pending.len();
            }
        }
        self.after_change(fua, pending)
    }

    /// Same as [`Self::write_zeroes`]: a trimmed block reads as zeros, not from the base.
    pub fn trim(&self, offset: u64, len: u64, fua: bool, base: &dyn BaseRead) -> Result<()> {
        self.write_zeroes(offset, len, fua, base)
    }

    /// Store base data for a flattener: `data` is the base's content at `offset` (block
    /// aligned; whole blocks, or up to the end of the device). Fills every block inside the
    /// base that still reads from it, in the current map **and in every snapshot**: one
    /// physical block per logical block, shared by all the maps that read the base there.
    /// Blocks the guest wrote, trimmed or that were hydrated already are left alone, so it
    /// never clobbers a racing guest write. Returns the number of logical blocks filled.
    ///
    /// Durability: the current map's fills are journaled (durable after the next flush); the
    /// snapshots' fills are kept in memory and written by the next checkpoint
    /// ([`Overlay::sync_all`]). A crash before that loses only the snapshots' fills: those
    /// blocks then read the base again, which holds the same bytes.
    pub fn hydrate(&self, offset: u64, data: &[u8]) -> Result<u64> {
        self.check_ok()?;
        let len = data.len() as u64;
        {
            let m = self.meta.lock();
            m.check_range(offset, len)?;
            if offset % BLOCK != 0 || (len % BLOCK != 0 && offset + len != m.size) {
                return Err(OverlayError::Unaligned);
            }
        }
        if len == 0 {
            return Ok(0);
        }
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        // Stripes keep guest writes off these blocks of the current map; the shared gate
        // keeps snapshot and revert out. Only `delete_snapshot` may change the maps meanwhile.
        let _stripes = self.lock_stripes(first, last);
        let _gate = self.gate.read();
        let mut meta = self.meta.lock();
        let base_blocks = meta.base_len.div_ceil(BLOCK);
        let todo: Vec<u64> = (first..=last)
            .filter(|&l| l < base_blocks && meta.reads_base(l))
            .collect();
        let fresh = meta.alloc(todo.len())?;
        drop(meta);
        let mut block = vec![0u8; BLOCK as usize];
        let mut res = Ok(());
        for (&l, &p) in todo.iter().zip(&fresh) {
            let s = ((l - first) * BLOCK) as usize;
            let e = (s + BLOCK as usize).min(data.len());
            block[..e - s].copy_from_slice(&data[s..e]);
            block[e - s..].fill(0);
            if let Err(e) = self.data.write_at(&block, p as u64 * BLOCK) {
                res = Err(io_err("writing overlay data")(e));
                break;
            }
        }
        let mut meta = self.meta.lock();
        if let Err(e) = res {
            meta.free.extend(fresh);
            return Err(e);
        }
        let mut filled = 0u64;
        for (&l, &p) in todo.iter().zip(&fresh) {
            let mut refs = 0;
            if meta.current.get(l) == Entry::Base {
                meta.log(Record::SetRun {
                    l,
                    count: 1,
                    first: Entry::Data(p),
                })?;
                refs += 1;
            }
            let mut snap_refs = 0;
            for snap in meta.snapshots.values_mut() {
                if snap.map.get(l) == Entry::Base {
                    snap.map.set_run(l, 1, Entry::Data(p), &mut |_| {});
                    snap_refs += 1;
                }
            }
            for _ in 0..snap_refs {
                meta.incref(p);
            }
            refs += snap_refs;
            if refs == 0 {
                // Its snapshot was deleted meanwhile: nothing points at the block.
                meta.free.insert(p);
            } else {
                filled += 1;
            }
        }
        let pending = meta.pending.len();
        drop(meta);
        drop(_gate);
        drop(_stripes);
        self.after_change(false, pending)?;
        Ok(filled)
    }

    /// Ranges `(offset, len)` inside `offset .. offset+len` still read from the base (in the
    /// current map or in any snapshot), in order, at most `max` of them. A flattener
    /// hydrates these.
    pub fn unallocated_ranges(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u64)> {
        let m = self.meta.lock();
        let end = (offset.saturating_add(len)).min(m.base_len);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while out.len() < max {
            let Some(r) = m.next_base_range(pos, end, u64::MAX) else {
                break;
            };
            out.push(r);
            pos = r.0 + r.1;
        }
        out
    }

    /// The first range at or after `offset` that still reads from the base (in the current
    /// map or any snapshot), at most `max_len` bytes long (whole blocks, or up to the end of
    /// the base). Costs O(`max_len`) however long the unallocated run is.
    pub fn next_unallocated(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let m = self.meta.lock();
        let end = m.base_len;
        m.next_base_range(offset, end, max_len.max(BLOCK))
    }

    /// Whether no block reads from the base any more, in the current map or any snapshot
    /// (the volume can drop its base).
    pub fn is_fully_allocated(&self) -> bool {
        self.next_unallocated(0, BLOCK).is_none()
    }

    /// Make every write that returned before this call durable. Also releases overlay blocks
    /// freed by now-durable changes, and writes a checkpoint when the journal is large.
    pub fn flush(&self) -> Result<()> {
        self.check_ok()?;
        let mut fl = self.flush.lock();
        let (batch, last_seq) = {
            let mut m = self.meta.lock();
            (std::mem::take(&mut m.pending), m.next_seq - 1)
        };
        let r = (|| -> Result<()> {
            // Invariant 1: data before the records that point to it.
            self.data.sync().map_err(io_err("syncing overlay data"))?;
            if !batch.is_empty() {
                let mut buf = Vec::with_capacity(batch.len() * 48);
                for (seq, rec) in &batch {
                    rec.encode(fl.generation, *seq, &mut buf);
                }
                self.journal
                    .write_at(&buf, fl.tail)
                    .map_err(io_err("writing the journal"))?;
                self.journal.sync().map_err(io_err("syncing the journal"))?;
                fl.tail += buf.len() as u64;
            }
            Ok(())
        })();
        r.map_err(|e| self.fail(e))?;
        self.release(last_seq)?;
        if fl.tail > self.journal_limit.load(Ordering::Relaxed) {
            self.checkpoint(&mut fl)?;
        }
        Ok(())
    }

    /// Flush, then write a checkpoint: every change so far is durable when it returns,
    /// including the snapshots' fills by [`Overlay::hydrate`], which are not journaled.
    pub fn sync_all(&self) -> Result<()> {
        self.flush()?;
        self.checkpoint(&mut self.flush.lock())
    }

    /// Invariant 2: apply decrements durable up to `durable_seq` and free blocks, punching
    /// holes for those beyond the spare allowance (the highest free blocks).
    fn release(&self, durable_seq: u64) -> Result<()> {
        let _gate = self.gate.write();
        let mut m = self.meta.lock();
        let freed = m.take_released(durable_seq);
        m.free.extend(freed.iter().copied());
        m.spare.extend(freed.iter().copied());
        let mut freed = m.take_punch();
        freed.sort_unstable();
        let mut i = 0;
        while i < freed.len() {
            let mut n = 1;
            while i + n < freed.len() && freed[i + n] == freed[i] + n as u32 {
                n += 1;
            }
            // Best effort: a block that keeps its bytes is still unreferenced.
            let _ = self.data.punch(freed[i] as u64 * BLOCK, n as u64 * BLOCK);
            i += n;
        }
        Ok(())
    }

    /// Write the whole state as a new checkpoint and start a new journal generation.
    fn checkpoint(&self, fl: &mut FlushState) -> Result<()> {
        let generation = fl.generation + 1;
        let (ck, last_seq) = {
            let mut m = self.meta.lock();
            // Records still pending are subsumed by the checkpoint.
            m.pending.clear();
            let ck = Checkpoint {
                generation,
                next_seq: m.next_seq,
                base_len: m.base_len,
                current: StoredMap {
                    name: String::new(),
                    size: m.size,
                    map: m.current.clone(),
                },
                snapshots: m
                    .snapshots
                    .iter()
                    .map(|(n, s)| StoredMap {
                        name: n.clone(),
                        size: s.size,
                        map: s.map.clone(),
                    })
                    .collect(),
            };
            (ck, m.next_seq - 1)
        };
        let r = (|| -> Result<()> {
            self.data.sync().map_err(io_err("syncing overlay data"))?;
            let bytes = ck.encode();
            let f = &self.ckpt[(generation % 2) as usize];
            f.write_at(&bytes, 0)
                .map_err(io_err("writing the checkpoint"))?;
            f.sync().map_err(io_err("syncing the checkpoint"))?;
            let sb = Superblock {
                generation,
                ckpt_len: bytes.len() as u64,
                ckpt_crc: crc32fast::hash(&bytes),
            };
            self.superf
                .write_at(&sb.encode(), (generation % 2) * format::SUPER_SLOT_STRIDE)
                .map_err(io_err("writing the superblock"))?;
            self.superf
                .sync()
                .map_err(io_err("syncing the superblock"))?;
            Ok(())
        })();
        r.map_err(|e| self.fail(e))?;
        fl.generation = generation;
        fl.tail = 0;
        self.release(last_seq)
    }

    fn check_name(name: &str) -> Result<()> {
        if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
            return Err(OverlayError::InvalidName(name.to_string()));
        }
        Ok(())
    }

    /// Freeze the current state as snapshot `name` (metadata only). Durable when it returns.
    pub fn snapshot(&self, name: &str) -> Result<()> {
        self.check_ok()?;
        Self::check_name(name)?;
        {
            // Exclusive: no write may be between choosing an in-place block and writing it.
            let _gate = self.gate.write();
            let mut m = self.meta.lock();
            if m.snapshots.contains_key(name) {
                return Err(OverlayError::SnapshotExists(name.to_string()));
            }
            m.log(Record::Snapshot(name.to_string()))?;
        }
        self.flush()
    }

    /// Make the volume's content (and size) that of snapshot `name` again; the snapshot stays.
    /// Durable when it returns.
    pub fn revert(&self, name: &str) -> Result<()> {
        self.check_ok()?;
        {
            let _gate = self.gate.write();
            let mut m = self.meta.lock();
            if !m.snapshots.contains_key(name) {
                return Err(OverlayError::SnapshotNotFound(name.to_string()));
            }
            m.log(Record::Revert(name.to_string()))?;
        }
        self.flush()
    }

    /// Delete snapshot `name`; blocks only it used are released. Durable when it returns.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.check_ok()?;
        {
            let mut m = self.meta.lock();
            if !m.snapshots.contains_key(name) {
                return Err(OverlayError::SnapshotNotFound(name.to_string()));
            }
            m.log(Record::DeleteSnapshot(name.to_string()))?;
        }
        self.flush()
    }

    /// The snapshots, by name.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        self.meta
            .lock()
            .snapshots
            .iter()
            .map(|(n, s)| SnapshotInfo {
                name: n.clone(),
                size: s.size,
            })
            .collect()
    }

    /// Grow the volume to `new_size` bytes; the new tail reads as zeros (never from the base).
    /// Durable when it returns.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_ok()?;
        {
            let mut m = self.meta.lock();
            if new_size < m.size {
                return Err(OverlayError::Shrink {
                    current: m.size,
                    requested: new_size,
                });
            }
            if new_size > MAX_SIZE {
                return Err(OverlayError::InvalidSize(new_size));
            }
            if new_size == m.size {
                return Ok(());
            }
            m.log(Record::Resize(new_size))?;
        }
        self.flush()
    }

    /// Create a new, independent overlay in `dest` whose content is snapshot `name` (same
    /// base). Copies the snapshot's overlay blocks; this overlay stays usable meanwhile.
    pub fn clone_snapshot(&self, name: &str, dest: Arc<dyn OverlayStorage>) -> Result<Overlay> {
        let (map, size, base_len) = {
            let mut m = self.meta.lock();
            let s = m
                .snapshots
                .get(name)
                .ok_or_else(|| OverlayError::SnapshotNotFound(name.to_string()))?
                .clone();
            m.pins += 1;
            (s.map, s.size, m.base_len)
        };
        let _pin = PinGuard(&self.meta);
        let dst = Overlay::create(dest, size, base_len)?;
        let mut newmap = BlockMap::new(size.div_ceil(BLOCK));
        let mut next: u32 = 0;
        let mut buf = Vec::new();
        for (l, n, e) in map.runs() {
            match e {
                Entry::Data(p) => {
                    let mut done = 0u64;
                    while done < n {
                        let k = (n - done).min(256);
                        buf.resize((k * BLOCK) as usize, 0);
                        self.data
                            .read_at(&mut buf, (p as u64 + done) * BLOCK)
                            .map_err(io_err("reading overlay data"))?;
                        dst.data
                            .write_at(&buf, (next as u64 + done) * BLOCK)
                            .map_err(io_err("writing overlay data"))?;
                        done += k;
                    }
                    newmap.set_run(l, n, Entry::Data(next), &mut |_| {});
                    next += n as u32;
                }
                other => newmap.set_run(l, n, other, &mut |_| {}),
            }
        }
        {
            let mut m = dst.meta.lock();
            m.current = newmap;
            m.rebuild_counts(next as u64);
        }
        dst.checkpoint(&mut dst.flush.lock())?;
        Ok(dst)
    }
}

/// Where the bytes `offset .. offset+len` (inside the map's volume) live according to `map`
/// over a base of `base_len` bytes, in order, adjacent pieces of the same kind merged.
fn map_range(map: &BlockMap, base_len: u64, offset: u64, len: u64) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    let mut push = |m: Mapping| {
        if let Some(last) = out.last_mut() {
            match (last, m) {
                (Mapping::Zero { len, .. }, Mapping::Zero { len: n, .. })
                | (Mapping::Base { len, .. }, Mapping::Base { len: n, .. }) => {
                    *len += n;
                    return;
                }
                (
                    Mapping::Overlay { phys_off, len, .. },
                    Mapping::Overlay {
                        phys_off: p2,
                        len: n,
                        ..
                    },
                ) if *phys_off + *len == p2 => {
                    *len += n;
                    return;
                }
                _ => {}
            }
        }
        out.push(m);
    };
    while pos < end {
        let l = pos / BLOCK;
        let within = pos % BLOCK;
        let n = (BLOCK - within).min(end - pos);
        match map.get(l) {
            Entry::Data(p) => push(Mapping::Overlay {
                offset: pos,
                phys_off: p as u64 * BLOCK + within,
                len: n,
            }),
            Entry::Zero => push(Mapping::Zero {
                offset: pos,
                len: n,
            }),
            Entry::Base => {
                let from_base = base_len.saturating_sub(pos).min(n);
                if from_base > 0 {
                    push(Mapping::Base {
                        offset: pos,
                        len: from_base,
                    });
                }
                if from_base < n {
                    push(Mapping::Zero {
                        offset: pos + from_base,
                        len: n - from_base,
                    });
                }
            }
        }
        pos += n;
    }
    out
}

/// The valid superblock slot with the highest generation.
fn read_super(f: &dyn OverlayFile) -> Result<Option<Superblock>> {
    let mut best: Option<Superblock> = None;
    for slot in 0..2u64 {
        let mut b = [0u8; SUPER_SLOT_LEN];
        f.read_at(&mut b, slot * format::SUPER_SLOT_STRIDE)
            .map_err(io_err("reading the superblock"))?;
        match Superblock::decode(&b) {
            Ok(Some(sb)) if best.is_none_or(|x| x.generation < sb.generation) => best = Some(sb),
            Ok(_) => {}
            Err(v) => return Err(OverlayError::UnsupportedVersion(v)),
        }
    }
    Ok(best)
}
