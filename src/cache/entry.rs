//! One image's cache: its data file and the state of each of its chunks.
//!
//! Chunk `i` lives at offset `i * chunk_size` of `<dir>/<key>.data` (a sparse file of the
//! image's size). Its in-memory [`Slot`] holds the block CRCs when the chunk is present and
//! the tick of its last use (for LRU). Readers hold the slot's read lock while they read and
//! verify, so eviction (write lock, then hole punch) never pulls bytes from under a reader.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::index::IndexedChunk;
use super::sched::{Priority, Urgency};
use super::{CacheError, ChunkSource, ImageResidency, Inner, BLOCK};
use crate::sys::{self, NoWait};

type FetchResult = Result<Bytes, Arc<CacheError>>;
type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

struct Slot {
    /// One CRC32 per 4 KiB block when present; `None` when not cached.
    crcs: RwLock<Option<Box<[u32]>>>,
    /// Tick of the last read, for LRU.
    tick: AtomicU32,
}

struct InFlight {
    fetch: SharedFetch,
    urgency: Urgency,
}

/// What a warm run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WarmReport {
    /// Chunks with data in the image.
    pub data_chunks: u64,
    /// Of those, already cached when warming started.
    pub already_cached: u64,
    /// Fetched by this run.
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    /// Fetches that failed (the warm run reports the first error).
    pub failed_chunks: u64,
}

/// Progress callback of [`CachedImage::warm`]: `(bytes_done, bytes_total)`.
pub type WarmProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Outcome of a verified read of a present chunk.
enum Hit {
    Done,
    NotCached,
    WouldBlock,
    Corrupt,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The cache of one image.
pub struct CachedImage {
    inner: Arc<Inner>,
    key: String,
    size: u64,
    chunk_size: u32,
    file: File,
    slots: Box<[Slot]>,
    inflight: Mutex<HashMap<u64, InFlight>>,
    source: Arc<dyn ChunkSource>,
    pinned: AtomicBool,
    nowait_supported: AtomicBool,
    /// The data file is in memory (tmpfs): the hot path may use a plain `pread`.
    memory_fs: bool,
    last_chunk: AtomicU64,
    streak: AtomicU32,
    cached_chunks: AtomicU64,
    cached_bytes: AtomicU64,
}

impl CachedImage {
    pub(super) fn open(
        inner: Arc<Inner>,
        key: &str,
        size: u64,
        chunk_size: u32,
        source: Arc<dyn ChunkSource>,
        indexed: Vec<IndexedChunk>,
        pinned: bool,
    ) -> Result<Arc<CachedImage>, CacheError> {
        let path = inner.cfg.dir.join(format!("{key}.data"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| CacheError::io(format!("opening {}", path.display()), e))?;
        let cur = file
            .metadata()
            .map_err(|e| CacheError::io(format!("stat {}", path.display()), e))?
            .len();
        if cur != size {
            file.set_len(size)
                .map_err(|e| CacheError::io(format!("sizing {}", path.display()), e))?;
        }
        let nchunks = size.div_ceil(chunk_size as u64);
        let slots: Box<[Slot]> = (0..nchunks)
            .map(|_| Slot {
                crcs: RwLock::new(None),
                tick: AtomicU32::new(0),
            })
            .collect();
        let inner_dir = inner.cfg.dir.clone();
        let img = CachedImage {
            inner,
            key: key.to_string(),
            size,
            chunk_size,
            file,
            slots,
            inflight: Mutex::new(HashMap::new()),
            source,
            pinned: AtomicBool::new(pinned),
            nowait_supported: AtomicBool::new(true),
            memory_fs: sys::is_memory_fs(&inner_dir),
            last_chunk: AtomicU64::new(u64::MAX),
            streak: AtomicU32::new(0),
            cached_chunks: AtomicU64::new(0),
            cached_bytes: AtomicU64::new(0),
        };
        // Adopt what an earlier run cached; drop rows that do not fit this image's geometry.
        let mut stale = Vec::new();
        for row in indexed {
            let fits = row.index < nchunks && row.len as usize == img.chunk_len(row.index);
            if fits {
                img.cached_chunks.fetch_add(1, Ordering::Relaxed);
                img.cached_bytes
                    .fetch_add(row.len as u64, Ordering::Relaxed);
                *img.slots[row.index as usize].crcs.write() = Some(row.crcs);
            } else {
                img.inner.used.fetch_sub(row.len as u64, Ordering::Relaxed);
                stale.push(row.index);
            }
        }
        if !stale.is_empty() {
            let rows: Vec<(&str, u64)> = stale.iter().map(|&i| (key, i)).collect();
            img.inner.index.remove(&rows)?;
        }
        Ok(Arc::new(img))
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn chunk_count(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Bytes of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64) as usize
    }

    /// Whether chunk `index` is cached locally.
    pub fn is_cached(&self, index: u64) -> bool {
        self.slots
            .get(index as usize)
            .is_some_and(|s| s.crcs.read().is_some())
    }

    pub fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }

    pub(super) fn set_pinned(&self, pinned: bool) {
        self.pinned.store(pinned, Ordering::Relaxed);
    }

    /// How much of this image is cached.
    pub fn residency(&self) -> ImageResidency {
        let data_chunks = (0..self.chunk_count())
            .filter(|&i| self.source.has_data(i))
            .count() as u64;
        ImageResidency {
            key: self.key.clone(),
            cached_bytes: self.cached_bytes.load(Ordering::Relaxed),
            cached_chunks: self.cached_chunks.load(Ordering::Relaxed),
            data_chunks: Some(data_chunks),
            pinned: self.is_pinned(),
        }
    }

    /// The hot path: read `buf.len()` bytes at `offset` within chunk `index` if the chunk is
    /// cached and its bytes are in the page cache. `None`: use [`CachedImage::read`].
    pub fn try_read(&self, index: u64, offset: usize, buf: &mut [u8]) -> Option<io::Result<()>> {
        if !self.nowait_supported.load(Ordering::Relaxed) {
            return None;
        }
        match self.read_present(index, offset, buf, true) {
            Ok(Hit::Done) => {
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.note_access(index);
                Some(Ok(()))
            }
            Ok(Hit::NotCached | Hit::WouldBlock) => None,
            Ok(Hit::Corrupt) => {
                self.evict_corrupt(index);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Read `buf.len()` bytes at `offset` within chunk `index`, fetching the chunk (once,
    /// however many readers wait) if it is not cached. Fails within the read timeout.
    pub async fn read(
        self: &Arc<Self>,
        index: u64,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), CacheError> {
        if index >= self.chunk_count() || offset + buf.len() > self.chunk_len(index) {
            return Err(CacheError::io(
                "read outside the chunk",
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let deadline = Instant::now() + self.inner.cfg.read_timeout;
        self.note_access(index);
        for _ in 0..4 {
            if self.is_cached(index) {
                let this = self.clone();
                let len = buf.len();
                let got = tokio::task::spawn_blocking(move || {
                    let mut tmp = vec![0u8; len];
                    match this.read_present(index, offset, &mut tmp, false) {
                        Ok(Hit::Done) => Ok(Some(tmp)),
                        Ok(Hit::Corrupt) => {
                            this.evict_corrupt(index);
                            Ok(None)
                        }
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .await
                .map_err(|_| CacheError::Aborted { index })?
                .map_err(|e| CacheError::io(format!("reading cached chunk {index}"), e))?;
                if let Some(tmp) = got {
                    self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                    buf.copy_from_slice(&tmp);
                    return Ok(());
                }
                continue;
            }
            let fetch = self.fetch(index, Priority::Demand);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let bytes = match tokio::time::timeout(remaining, fetch).await {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => return Err(clone_error(&e, index)),
                Err(_) => {
                    return Err(CacheError::Timeout {
                        index,
                        after: self.inner.cfg.read_timeout,
                    })
                }
            };
            buf.copy_from_slice(&bytes[offset..offset + buf.len()]);
            return Ok(());
        }
        Err(CacheError::Aborted { index })
    }

    /// Fetch chunks `first ..= last` in the background (NBD_CMD_CACHE, read-ahead) and wait
    /// until they are cached. Holes and cached chunks are skipped.
    pub async fn prefetch(self: &Arc<Self>, first: u64, last: u64) -> Result<(), CacheError> {
        let last = last.min(self.chunk_count().saturating_sub(1));
        let mut pending = FuturesUnordered::new();
        for i in first..=last {
            if self.source.has_data(i) && !self.is_cached(i) {
                pending.push(self.fetch(i, Priority::Background));
            }
        }
        let mut first_err = None;
        while let Some(r) = pending.next().await {
            if let Err(e) = r {
                first_err.get_or_insert_with(|| clone_error(&e, first));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Fetch every chunk with data that is not cached, `parallel` at a time, at most
    /// `rate` bytes per second when set; reports progress in bytes.
    pub async fn warm(
        self: &Arc<Self>,
        parallel: usize,
        rate: Option<u64>,
        progress: Option<WarmProgress>,
    ) -> Result<WarmReport, CacheError> {
        let mut report = WarmReport::default();
        let mut todo = Vec::new();
        let mut total = 0u64;
        let mut done = 0u64;
        for i in 0..self.chunk_count() {
            if !self.source.has_data(i) {
                continue;
            }
            report.data_chunks += 1;
            let len = self.chunk_len(i) as u64;
            total += len;
            if self.is_cached(i) {
                report.already_cached += 1;
                done += len;
            } else {
                todo.push(i);
            }
        }
        if let Some(p) = &progress {
            p(done, total);
        }
        let started = Instant::now();
        let mut issued = 0u64;
        let mut pending = FuturesUnordered::new();
        let mut next = todo.into_iter();
        let mut first_err = None;
        loop {
            while pending.len() < parallel.max(1) {
                let Some(i) = next.next() else { break };
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    // Token bucket: start this chunk when the bytes issued so far fit the rate.
                    let due = started + Duration::from_secs_f64(issued as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let len = self.chunk_len(i) as u64;
                issued += len;
                let f = self.fetch(i, Priority::Background);
                pending.push(async move { (len, f.await) });
            }
            let Some((len, r)) = pending.next().await else {
                break;
            };
            match r {
                Ok(_) => {
                    report.fetched_chunks += 1;
                    report.fetched_bytes += len;
                    done += len;
                }
                Err(e) => {
                    report.failed_chunks += 1;
                    first_err.get_or_insert_with(|| clone_error(&e, 0));
                }
            }
            if let Some(p) = &progress {
                p(done, total);
            }
        }
        match first_err {
            Some(e) if report.failed_chunks > 0 => Err(e),
            _ => Ok(report),
        }
    }

    /// The single-flight fetch of chunk `index`: joins a fetch in flight or starts one.
    fn fetch(self: &Arc<Self>, index: u64, prio: Priority) -> SharedFetch {
        let mut inflight = self.inflight.lock();
        if let Some(f) = inflight.get(&index) {
            if prio == Priority::Demand {
                f.urgency.promote();
                self.inner.sched.kick();
            }
            return f.fetch.clone();
        }
        let urgency = Urgency::default();
        if prio == Priority::Demand {
            urgency.promote();
        }
        let this = self.clone();
        let u = urgency.clone();
        let task = tokio::spawn(async move {
            // Removes the in-flight entry however this task ends (success, error, panic).
            let _entry = InFlightGuard {
                image: &this,
                index,
            };
            this.fetch_and_store(index, prio, &u).await
        });
        let fetch: SharedFetch = async move {
            match task.await {
                Ok(r) => r,
                Err(_) => Err(Arc::new(CacheError::Aborted { index })),
            }
        }
        .boxed()
        .shared();
        inflight.insert(
            index,
            InFlight {
                fetch: fetch.clone(),
                urgency,
            },
        );
        fetch
    }

    async fn fetch_and_store(
        self: &Arc<Self>,
        index: u64,
        prio: Priority,
        urgency: &Urgency,
    ) -> FetchResult {
        let _permit = self.inner.sched.acquire(prio, urgency).await;
        if self.is_cached(index) {
            // Fetched by an earlier flight between the caller's check and now.
            let this = self.clone();
            let len = self.chunk_len(index);
            let r = tokio::task::spawn_blocking(move || {
                let mut v = vec![0u8; len];
                match this.read_present(index, 0, &mut v, false) {
                    Ok(Hit::Done) => Some(Bytes::from(v)),
                    _ => None,
                }
            })
            .await
            .ok()
            .flatten();
            if let Some(b) = r {
                return Ok(b);
            }
        }
        let len = self.chunk_len(index);
        let timeout = self.inner.cfg.fetch_timeout;
        let bytes = match tokio::time::timeout(timeout, self.source.fetch(index, len)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(Arc::new(CacheError::Fetch { index, source: e })),
            Err(_) => {
                return Err(Arc::new(CacheError::Timeout {
                    index,
                    after: timeout,
                }))
            }
        };
        if bytes.len() != len {
            return Err(Arc::new(CacheError::WrongLength {
                index,
                expected: len,
                got: bytes.len(),
            }));
        }
        self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .fetched_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let this = self.clone();
        let b = bytes.clone();
        let stored = tokio::task::spawn_blocking(move || this.store(index, &b)).await;
        match stored {
            Ok(Ok(())) => {}
            // The bytes are verified: serve them even if caching them failed.
            Ok(Err(e)) => {
                tracing::warn!(image = %self.key, index, error = %e, "could not cache a chunk")
            }
            Err(_) => tracing::warn!(image = %self.key, index, "caching a chunk was aborted"),
        }
        Ok(bytes)
    }

    /// Make chunk `index` present: bytes durable first, then the index row, then memory.
    fn store(&self, index: u64, bytes: &[u8]) -> Result<(), CacheError> {
        let offset = index * self.chunk_size as u64;
        sys::pwrite_all(&self.file, bytes, offset)
            .map_err(|e| CacheError::io(format!("writing chunk {index} of {}", self.key), e))?;
        self.file
            .sync_data()
            .map_err(|e| CacheError::io(format!("syncing {}.data", self.key), e))?;
        let crcs: Box<[u32]> = bytes.chunks(BLOCK).map(crc32fast::hash).collect();
        self.inner
            .index
            .insert(&self.key, index, bytes.len() as u32, &crcs)?;
        let slot = &self.slots[index as usize];
        {
            let mut g = slot.crcs.write();
            if g.is_none() {
                self.cached_chunks.fetch_add(1, Ordering::Relaxed);
                self.cached_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.inner
                    .used
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            *g = Some(crcs);
        }
        slot.tick.store(self.inner.next_tick(), Ordering::Relaxed);
        self.inner.evict_if_needed();
        Ok(())
    }

    /// Read from a present chunk and verify every block touched. `nowait`: never block on
    /// disk (reports `WouldBlock`).
    fn read_present(
        &self,
        index: u64,
        offset: usize,
        buf: &mut [u8],
        nowait: bool,
    ) -> io::Result<Hit> {
        let Some(slot) = self.slots.get(index as usize) else {
            return Ok(Hit::NotCached);
        };
        let guard = slot.crcs.read();
        let Some(crcs) = guard.as_ref() else {
            return Ok(Hit::NotCached);
        };
        let chunk_len = self.chunk_len(index);
        let first = offset / BLOCK;
        let end = offset + buf.len();
        let last = (end - 1) / BLOCK;
        let span_start = first * BLOCK;
        let span_end = ((last + 1) * BLOCK).min(chunk_len);
        let file_off = index * self.chunk_size as u64 + span_start as u64;
        let read = |dst: &mut [u8]| -> io::Result<Hit> {
            if nowait && !self.memory_fs {
                match sys::pread_nowait(&self.file, dst, file_off)? {
                    NoWait::Done => {}
                    NoWait::WouldBlock => return Ok(Hit::WouldBlock),
                    NoWait::Unsupported => {
                        self.nowait_supported.store(false, Ordering::Relaxed);
                        return Ok(Hit::WouldBlock);
                    }
                }
            } else {
                sys::pread_exact(&self.file, dst, file_off)?;
            }
            for (i, block) in dst.chunks(BLOCK).enumerate() {
                if crc32fast::hash(block) != crcs[first + i] {
                    return Ok(Hit::Corrupt);
                }
            }
            Ok(Hit::Done)
        };
        let hit = if span_start == offset && span_end == end {
            read(buf)?
        } else {
            SCRATCH.with(|s| -> io::Result<Hit> {
                let mut s = s.borrow_mut();
                s.resize(span_end - span_start, 0);
                let h = read(&mut s[..])?;
                if let Hit::Done = h {
                    buf.copy_from_slice(&s[offset - span_start..end - span_start]);
                }
                Ok(h)
            })?
        };
        Ok(hit)
    }

    /// A cached chunk failed verification: forget it (it will be fetched again) and count it.
    fn evict_corrupt(&self, index: u64) {
        tracing::warn!(image = %self.key, index, "cached chunk failed verification; evicting and fetching it again");
        self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.evict(&[index]) {
            tracing::warn!(image = %self.key, index, error = %e, "evicting a corrupt chunk failed");
        }
    }

    /// Remove `chunks` from the cache: index first (durable), then memory, then the bytes.
    pub(super) fn evict(&self, chunks: &[u64]) -> Result<(), CacheError> {
        let rows: Vec<(&str, u64)> = chunks.iter().map(|&i| (self.key.as_str(), i)).collect();
        self.inner.index.remove(&rows)?;
        for &i in chunks {
            let Some(slot) = self.slots.get(i as usize) else {
                continue;
            };
            let mut g = slot.crcs.write();
            if g.take().is_some() {
                let len = self.chunk_len(i) as u64;
                self.cached_chunks.fetch_sub(1, Ordering::Relaxed);
                self.cached_bytes.fetch_sub(len, Ordering::Relaxed);
                self.inner.used.fetch_sub(len, Ordering::Relaxed);
                self.inner.counters.evicted.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .counters
                    .evicted_bytes
                    .fetch_add(len, Ordering::Relaxed);
                if let Err(e) = sys::punch_hole(&self.file, i * self.chunk_size as u64, len) {
                    tracing::debug!(image = %self.key, index = i, error = %e, "hole punch failed");
                }
            }
        }
        Ok(())
    }

    /// The present chunks as index rows (for handing them back to the cache on drop).
    fn present_rows(&self) -> Vec<IndexedChunk> {
        let mut rows = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(crcs) = slot.crcs.read().as_ref() {
                rows.push(IndexedChunk {
                    index: i as u64,
                    len: self.chunk_len(i as u64) as u32,
                    crcs: crcs.clone(),
                });
            }
        }
        rows
    }

    /// Forget every chunk in memory (the caller removes index rows and the file).
    pub(super) fn forget_all(&self) {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.crcs.write().take().is_some() {
                self.inner
                    .used
                    .fetch_sub(self.chunk_len(i as u64) as u64, Ordering::Relaxed);
            }
        }
        self.cached_chunks.store(0, Ordering::Relaxed);
        self.cached_bytes.store(0, Ordering::Relaxed);
    }

    /// Append `(tick, image_tag, chunk)` for every present chunk.
    pub(super) fn collect_lru_candidates(&self, tag: usize, out: &mut Vec<(u32, usize, u64)>) {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.crcs.read().is_some() {
                out.push((slot.tick.load(Ordering::Relaxed), tag, i as u64));
            }
        }
    }

    /// Record a read of chunk `index`: refresh its LRU tick; on a sequential pattern start
    /// read-ahead of the next chunks (window doubling with the run length).
    fn note_access(&self, index: u64) {
        if let Some(slot) = self.slots.get(index as usize) {
            slot.tick.store(self.inner.next_tick(), Ordering::Relaxed);
        }
        let last = self.last_chunk.swap(index, Ordering::Relaxed);
        if last == index {
            return;
        }
        let streak = if last != u64::MAX && index == last + 1 {
            self.streak.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.streak.store(0, Ordering::Relaxed);
            0
        };
        let max = self.inner.cfg.readahead_chunks;
        if streak == 0 || max == 0 {
            return;
        }
        let window = (1u64 << streak.min(16)).min(max);
        self.start_readahead(index + 1, index + window);
    }

    fn start_readahead(&self, first: u64, last: u64) {
        let last = last.min(self.chunk_count().saturating_sub(1));
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(this) = self.self_arc() else { return };
        for i in first..=last {
            if !self.source.has_data(i)
                || self.is_cached(i)
                || self.inflight.lock().contains_key(&i)
            {
                continue;
            }
            let f = this.fetch(i, Priority::Background);
            handle.spawn(async move {
                let _ = f.await;
            });
        }
    }

    /// An owning handle to `self`, found through the cache's registry.
    fn self_arc(&self) -> Option<Arc<CachedImage>> {
        self.inner
            .images
            .lock()
            .get(&self.key)
            .and_then(|w| w.upgrade())
            .filter(|a| std::ptr::eq(Arc::as_ptr(a), self))
    }
}

/// Removes an in-flight entry when its fetch task ends.
struct InFlightGuard<'a> {
    image: &'a CachedImage,
    index: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.image.inflight.lock().remove(&self.index);
    }
}

/// A fresh error describing a shared fetch failure (the shared one stays with the flight).
fn clone_error(e: &CacheError, index: u64) -> CacheError {
    match e {
        CacheError::Timeout { index, after } => CacheError::Timeout {
            index: *index,
            after: *after,
        },
        CacheError::Fetch { index, source } => CacheError::Fetch {
            index: *index,
            source: super::SourceError {
                kind: source.kind,
                message: source.message.clone(),
                source: None,
            },
        },
        CacheError::WrongLength {
            index,
            expected,
            got,
        } => CacheError::WrongLength {
            index: *index,
            expected: *expected,
            got: *got,
        },
        other => CacheError::io(
            other.to_string(),
            io::Error::other(format!("chunk {index}")),
        ),
    }
}

/// A closed image's chunks stay cached: they go back to the cache's orphans, where eviction,
/// `status` and `remove_image` see them and the next `open_image` adopts them.
impl Drop for CachedImage {
    fn drop(&mut self) {
        let rows = self.present_rows();
        if rows.is_empty() {
            return;
        }
        // Not under the images lock: handles are dropped while it is held (status, pin).
        // An `open_image` racing with this drop misses these rows until the next start.
        self.inner
            .orphans
            .lock()
            .entry(self.key.clone())
            .or_default()
            .extend(rows);
    }
}
