//! The chunk cache on primary storage: persistent, verified, bounded.
//!
//! Main types: [`ChunkCache`] (one per daemon: the directory, the persistent index, the fetch
//! scheduler, accounting and eviction) and [`CachedImage`] (one per image: its data file and
//! the in-memory state of its chunks). Chunks come from a [`ChunkSource`] (a store, through
//! the image's manifest), which verifies them against their digest before handing them over.
//!
//! Invariants:
//! - A chunk is marked present (in memory and in the index) only after its bytes are durable
//!   in the image's data file (`pwrite` + `fdatasync`, then a durable index commit).
//! - Every 4 KiB block of a present chunk has a CRC32 in the index; every read verifies the
//!   blocks it touches, so a byte that rotted on disk is never served: the chunk is evicted,
//!   counted in `corrupt`, and fetched again.
//! - At most one fetch per chunk is in flight ([`CachedImage`]'s single-flight map, whose
//!   entries are removed by an RAII guard inside the fetch task, whatever happens to it).
//! - Used bytes stay under `max_bytes`: above the high watermark, least-recently-used chunks of
//!   unpinned images are evicted down to the low watermark.
//!
//! Layout on disk: `docs/cache-format.md`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};

pub mod entry;
pub mod index;
pub mod sched;

pub use entry::{CachedImage, WarmReport};
use index::{CacheIndex, IndexedChunk};
pub use sched::{FetchScheduler, Priority};

/// Bytes per CRC-verified block.
pub const BLOCK: usize = 4096;

/// Settings of a cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Directory holding `index.redb` and one `<image>.data` file per image.
    pub dir: PathBuf,
    /// Upper bound of cached bytes.
    pub max_bytes: u64,
    /// Eviction starts above `max_bytes * high_watermark` ...
    pub high_watermark: f64,
    /// ... and stops at `max_bytes * low_watermark`.
    pub low_watermark: f64,
    /// Concurrent fetches, all images together.
    pub fetch_concurrency: usize,
    /// Fetch slots kept free of background work for demand reads.
    pub reserved_for_demand: usize,
    /// Longest a single chunk fetch may take.
    pub fetch_timeout: Duration,
    /// Longest a reader waits for a chunk (queueing included) before failing with EIO.
    pub read_timeout: Duration,
    /// Most chunks prefetched ahead of a sequential reader.
    pub readahead_chunks: u64,
}

impl CacheConfig {
    /// Defaults for a cache in `dir` bounded to `max_bytes`.
    pub fn new(dir: PathBuf, max_bytes: u64) -> CacheConfig {
        CacheConfig {
            dir,
            max_bytes,
            high_watermark: 0.95,
            low_watermark: 0.80,
            fetch_concurrency: 16,
            reserved_for_demand: 4,
            fetch_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            readahead_chunks: 8,
        }
    }
}

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index error")]
    Index(#[source] redb::Error),
    #[error("cache index has schema version {found}, this imgcache supports up to {supported}")]
    SchemaTooNew { found: u64, supported: u64 },
    #[error("cache i/o error: {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("fetching chunk {index} failed")]
    Fetch {
        index: u64,
        #[source]
        source: SourceError,
    },
    #[error("chunk {index} not available after {after:?}")]
    Timeout { index: u64, after: Duration },
    #[error("chunk {index} from the store has {got} bytes, expected {expected}")]
    WrongLength {
        index: u64,
        expected: usize,
        got: usize,
    },
    #[error("invalid cache key {0:?}")]
    InvalidKey(String),
    #[error("the fetch of chunk {index} stopped unexpectedly")]
    Aborted { index: u64 },
}

impl Classify for CacheError {
    fn kind(&self) -> ErrorKind {
        match self {
            CacheError::Index(_) | CacheError::SchemaTooNew { .. } => ErrorKind::Internal,
            CacheError::Io { source, .. } => ErrorKind::of_io(source),
            CacheError::Fetch { source, .. } => source.kind,
            CacheError::Timeout { .. } => ErrorKind::Timeout,
            CacheError::WrongLength { .. } => ErrorKind::Corrupt,
            CacheError::InvalidKey(_) => ErrorKind::InvalidInput,
            CacheError::Aborted { .. } => ErrorKind::Io,
        }
    }
}

impl CacheError {
    fn io(context: impl Into<String>, source: io::Error) -> CacheError {
        CacheError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why a chunk source could not deliver a chunk.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: ErrorKind,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Where the chunks of one image come from.
pub trait ChunkSource: Send + Sync + 'static {
    /// Fetch chunk `index`: exactly `len` bytes, verified against the chunk's digest where
    /// one is known. Must not block the calling thread.
    fn fetch(&self, index: u64, len: usize) -> BoxFuture<'static, Result<Bytes, SourceError>>;

    /// Whether chunk `index` has bytes to fetch (false for holes, which read as zeros).
    fn has_data(&self, index: u64) -> bool;
}

/// Counters of a cache (since start).
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub corrupt: AtomicU64,
    pub evicted: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

/// How much of one image is cached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageResidency {
    pub key: String,
    pub cached_bytes: u64,
    pub cached_chunks: u64,
    /// Chunks with data (holes excluded); `None` when the image is not open.
    pub data_chunks: Option<u64>,
    pub pinned: bool,
}

/// A snapshot of the cache's state for `imgcache cache status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheStatus {
    pub dir: String,
    pub max_bytes: u64,
    pub used_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
    pub fetched_bytes: u64,
    pub corrupt_chunks: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    pub images: Vec<ImageResidency>,
}

pub(crate) struct Inner {
    cfg: CacheConfig,
    index: CacheIndex,
    sched: Arc<FetchScheduler>,
    used: AtomicU64,
    tick: AtomicU32,
    images: Mutex<HashMap<String, Weak<CachedImage>>>,
    /// Indexed chunks of images not opened since start: evicted first.
    orphans: Mutex<HashMap<String, Vec<IndexedChunk>>>,
    pinned: Mutex<HashSet<String>>,
    evicting: Mutex<()>,
    counters: CacheCounters,
}

/// The chunk cache of a daemon.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

fn validate_cache_key(key: &str) -> Result<(), CacheError> {
    if key.is_empty()
        || key.len() > 128
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || key.starts_with('.')
    {
        return Err(CacheError::InvalidKey(key.to_string()));
    }
    Ok(())
}

impl ChunkCache {
    /// Open (creating if needed) the cache in `cfg.dir`, loading its index.
    pub fn open(cfg: CacheConfig) -> Result<ChunkCache, CacheError> {
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| CacheError::io(format!("creating {}", cfg.dir.display()), e))?;
        let index = CacheIndex::open(&cfg.dir.join("index.redb"))?;
        let loaded = index.load()?;
        let pinned = index.pinned()?;
        let used = loaded
            .values()
            .flat_map(|v| v.iter().map(|c| c.len as u64))
            .sum();
        let sched = FetchScheduler::new(cfg.fetch_concurrency, cfg.reserved_for_demand);
        Ok(ChunkCache {
            inner: Arc::new(Inner {
                cfg,
                index,
                sched,
                used: AtomicU64::new(used),
                tick: AtomicU32::new(1),
                images: Mutex::new(HashMap::new()),
                orphans: Mutex::new(loaded),
                pinned: Mutex::new(pinned),
                evicting: Mutex::new(()),
                counters: CacheCounters::default(),
            }),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    /// Bytes cached now.
    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.inner.counters
    }

    /// The cache of image `key` (`size` bytes in chunks of `chunk_size`), reading misses
    /// from `source`. Chunks cached by an earlier run are present at once. Opening an image
    /// that is open already returns the same handle.
    pub fn open_image(
        &self,
        key: &str,
        size: u64,
        chunk_size: u32,
        source: Arc<dyn ChunkSource>,
    ) -> Result<Arc<CachedImage>, CacheError> {
        validate_cache_key(key)?;
        let mut images = self.inner.images.lock();
        if let Some(img) = images.get(key).and_then(Weak::upgrade) {
            if img.size() == size && img.chunk_size() == chunk_size {
                return Ok(img);
            }
        }
        let indexed = self.inner.orphans.lock().remove(key).unwrap_or_default();
        let pinned = self.inner.pinned.lock().contains(key);
        let img = CachedImage::open(
            self.inner.clone(),
            key,
            size,
            chunk_size,
            source,
            indexed,
            pinned,
        )?;
        images.insert(key.to_string(), Arc::downgrade(&img));
        Ok(img)
    }

    /// Drop everything cached of image `key` (its image was expunged).
    pub fn remove_image(&self, key: &str) -> Result<(), CacheError> {
        validate_cache_key(key)?;
        let live = self
            .inner
            .images
            .lock()
            .remove(key)
            .and_then(|w| w.upgrade());
        if let Some(img) = live {
            img.forget_all();
        }
        if let Some(rows) = self.inner.orphans.lock().remove(key) {
            let bytes: u64 = rows.iter().map(|c| c.len as u64).sum();
            self.inner.used.fetch_sub(bytes, Ordering::Relaxed);
        }
        self.inner.index.remove_image(key)?;
        self.inner.pinned.lock().remove(key);
        let path = self.inner.cfg.dir.join(format!("{key}.data"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Pin (never evict) or unpin image `key`.
    pub fn set_pinned(&self, key: &str, pinned: bool) -> Result<(), CacheError> {
        validate_cache_key(key)?;
        self.inner.index.set_pinned(key, pinned)?;
        if pinned {
            self.inner.pinned.lock().insert(key.to_string());
        } else {
            self.inner.pinned.lock().remove(key);
        }
        if let Some(img) = self.inner.images.lock().get(key).and_then(Weak::upgrade) {
            img.set_pinned(pinned);
        }
        Ok(())
    }

    /// Size, hit ratio and per-image residency.
    pub fn status(&self) -> CacheStatus {
        let c = &self.inner.counters;
        let hits = c.hits.load(Ordering::Relaxed);
        let misses = c.misses.load(Ordering::Relaxed);
        let pinned = self.inner.pinned.lock().clone();
        let mut images: Vec<ImageResidency> = self
            .inner
            .images
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .map(|img| img.residency())
            .collect();
        for (key, rows) in self.inner.orphans.lock().iter() {
            images.push(ImageResidency {
                key: key.clone(),
                cached_bytes: rows.iter().map(|c| c.len as u64).sum(),
                cached_chunks: rows.len() as u64,
                data_chunks: None,
                pinned: pinned.contains(key),
            });
        }
        images.sort_by(|a, b| a.key.cmp(&b.key));
        CacheStatus {
            dir: self.inner.cfg.dir.display().to_string(),
            max_bytes: self.inner.cfg.max_bytes,
            used_bytes: self.used_bytes(),
            hits,
            misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            corrupt_chunks: c.corrupt.load(Ordering::Relaxed),
            evicted_chunks: c.evicted.load(Ordering::Relaxed),
            evicted_bytes: c.evicted_bytes.load(Ordering::Relaxed),
            images,
        }
    }

    /// Evict now if above the high watermark (normally done after each insert).
    pub fn evict_if_needed(&self) {
        self.inner.evict_if_needed();
    }
}

impl Inner {
    fn next_tick(&self) -> u32 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    /// Evict least-recently-used chunks of unpinned images while above the high watermark,
    /// down to the low watermark. Chunks of images not opened since start go first.
    fn evict_if_needed(&self) {
        let max = self.cfg.max_bytes as f64;
        let high = (max * self.cfg.high_watermark) as u64;
        let low = (max * self.cfg.low_watermark) as u64;
        if self.used.load(Ordering::Relaxed) <= high {
            return;
        }
        let Some(_running) = self.evicting.try_lock() else {
            return;
        };
        let pinned = self.pinned.lock().clone();

        // Orphans first: nobody has read them since start.
        let mut orphan_victims = Vec::new();
        {
            let mut orphans = self.orphans.lock();
            let keys: Vec<String> = orphans
                .keys()
                .filter(|k| !pinned.contains(*k))
                .cloned()
                .collect();
            for key in keys {
                if self.used.load(Ordering::Relaxed) <= low {
                    break;
                }
                if let Some(rows) = orphans.remove(&key) {
                    let bytes: u64 = rows.iter().map(|c| c.len as u64).sum();
                    self.used.fetch_sub(bytes, Ordering::Relaxed);
                    self.counters
                        .evicted
                        .fetch_add(rows.len() as u64, Ordering::Relaxed);
                    self.counters
                        .evicted_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                    orphan_victims.push(key);
                }
            }
        }
        for key in orphan_victims {
            if let Err(e) = self.index.remove_image(&key) {
                tracing::warn!(image = %key, error = %e, "cache eviction: index update failed");
            }
            let _ = std::fs::remove_file(self.cfg.dir.join(format!("{key}.data")));
        }
        if self.used.load(Ordering::Relaxed) <= low {
            return;
        }

        let live: Vec<Arc<CachedImage>> = self
            .images
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .filter(|img| !img.is_pinned())
            .collect();
        let mut candidates: Vec<(u32, usize, u64)> = Vec::new();
        for (i, img) in live.iter().enumerate() {
            img.collect_lru_candidates(i, &mut candidates);
        }
        candidates.sort_unstable_by_key(|&(tick, _, _)| tick);
        let now = self.tick.load(Ordering::Relaxed);
        let mut batch: Vec<(usize, u64)> = Vec::new();
        let mut freed = 0u64;
        let need = self.used.load(Ordering::Relaxed).saturating_sub(low);
        for (_, img, chunk) in candidates {
            if freed >= need {
                break;
            }
            freed += live[img].chunk_len(chunk) as u64;
            batch.push((img, chunk));
        }
        // Group per image: one index transaction and one pass each.
        let mut per_image: HashMap<usize, Vec<u64>> = HashMap::new();
        for (img, chunk) in batch {
            per_image.entry(img).or_default().push(chunk);
        }
        for (img, chunks) in per_image {
            if let Err(e) = live[img].evict(&chunks) {
                tracing::warn!(image = %live[img].key(), error = %e, "cache eviction failed");
            }
        }
        tracing::debug!(freed, tick = now, "cache eviction pass done");
    }
}

#[cfg(test)]
mod tests;
