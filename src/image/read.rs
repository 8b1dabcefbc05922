//! The read-only image device: a manifest over chunks in a store.
//!
//! The read path is a short loop over the chunks a request spans: a hole is zero-filled
//! without I/O; a data chunk is read from its chunk object.
//!
//! **Hot path** ([`BlockDevice::try_read_nowait`]), for stores with a local directory: the
//! chunk's file comes from an [`FdCache`] (digest → open `File`), and the bytes are read
//! with `preadv2(RWF_NOWAIT)`, which fails with `EAGAIN` instead of waiting for the disk.
//! No allocation, no catalog, no async on a cache hit. On a cache miss it opens the chunk
//! file inline with `openat2(RESOLVE_CACHED)`, which succeeds only if the path lookup can
//! be done from the dentry cache and fails with `EAGAIN` instead of reading directories
//! from disk; then it returns `None` and the blocking [`BlockDevice::read`] that the caller
//! falls back to opens the file and fills the cache. (Kernels without `openat2` or
//! `RESOLVE_CACHED`, before 5.12, always take that fallback on a miss.)
//!
//! Some file systems reject `RWF_NOWAIT` with `EOPNOTSUPP` — notably tmpfs. tmpfs data is
//! always in memory, so on tmpfs/ramfs (detected once with `statfs` at open) the hot path
//! uses a plain `pread`. Elsewhere the first `EOPNOTSUPP` switches the image to "no
//! non-blocking reads" and `try_read_nowait` returns `None` without a syscall from then on.
//!
//! Stores without a local directory: `read` fetches the chunk ranges with `get_range`, and
//! `try_read_nowait` always returns `None`.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;

use super::remote::{ManifestSource, ObjectSource};
use super::{chunk_key, ImageError, Manifest};
use crate::cache::{CachedImage, ChunkCache};
use crate::device::{errno_error, BlockDevice, Extent, ExtentKind, MappedPiece, Residency};
use crate::store::Store;
use crate::sys::NoWait;
use crate::types::Digest;

/// Open chunk files the default [`FdCache`] keeps.
pub const DEFAULT_FD_CACHE_CAPACITY: usize = 4096;

/// Digests are uniformly random already: hash by their first 8 bytes.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
    fn write_usize(&mut self, _len: usize) {}
}

type DigestMap<V> = HashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

const SHARDS: usize = 16;

/// A bounded cache of open chunk files, keyed by digest, shareable between images; and,
/// beside it, of read-only mappings of chunk files on memory file systems (see
/// [`FdCache::get_map`]).
///
/// Sharded by digest; each shard evicts with the clock algorithm (an entry used since the
/// hand last passed gets a second chance). Evicted files close (and mappings unmap) when
/// the last reader using them drops its `Arc` (or `Bytes`).
pub struct FdCache {
    files: Clock<Arc<File>>,
    maps: Clock<Bytes>,
}

/// The sharded clock cache behind [`FdCache`].
struct Clock<V> {
    shards: [CachePadded<Mutex<Shard<V>>>; SHARDS],
    per_shard: usize,
}

/// Keeps each shard's lock on its own cache lines, so threads using different shards do
/// not contend on the same line.
#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shard<V> {
    map: DigestMap<usize>,
    slots: Vec<Slot<V>>,
    hand: usize,
}

struct Slot<V> {
    digest: Digest,
    value: V,
    referenced: bool,
}

impl<V: Clone> Clock<V> {
    fn new(capacity: usize) -> Clock<V> {
        Clock {
            shards: std::array::from_fn(|_| {
                CachePadded(Mutex::new(Shard {
                    map: DigestMap::default(),
                    slots: Vec::new(),
                    hand: 0,
                }))
            }),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    #[inline]
    fn shard(&self, d: &Digest) -> &Mutex<Shard<V>> {
        &self.shards[usize::from(d.0[31]) % SHARDS]
    }

    #[inline]
    fn get(&self, d: &Digest) -> Option<V> {
        let mut shard = self.shard(d).lock();
        let i = *shard.map.get(d)?;
        let slot = &mut shard.slots[i];
        slot.referenced = true;
        Some(slot.value.clone())
    }

    fn insert(&self, d: Digest, value: V) -> V {
        let mut guard = self.shard(&d).lock();
        let shard = &mut *guard;
        if let Some(&i) = shard.map.get(&d) {
            return shard.slots[i].value.clone();
        }
        let slot = Slot {
            digest: d,
            value: value.clone(),
            referenced: false,
        };
        if shard.slots.len() < self.per_shard {
            shard.map.insert(d, shard.slots.len());
            shard.slots.push(slot);
            return value;
        }
        loop {
            let h = shard.hand;
            shard.hand = (h + 1) % shard.slots.len();
            if shard.slots[h].referenced {
                shard.slots[h].referenced = false;
                continue;
            }
            shard.map.remove(&shard.slots[h].digest);
            shard.map.insert(d, h);
            shard.slots[h] = slot;
            return value;
        }
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().slots.len()).sum()
    }
}

impl FdCache {
    /// A cache holding up to about `capacity` open files (at least one per shard), and as
    /// many mappings.
    pub fn new(capacity: usize) -> FdCache {
        FdCache {
            files: Clock::new(capacity),
            maps: Clock::new(capacity),
        }
    }

    /// The open file of chunk `d`, if cached.
    #[inline]
    pub fn get(&self, d: &Digest) -> Option<Arc<File>> {
        self.files.get(d)
    }

    /// Cache `file` for `d` (keeping an already cached one); returns the cached file.
    pub fn insert(&self, d: Digest, file: Arc<File>) -> Arc<File> {
        self.files.insert(d, file)
    }

    /// The whole mapped chunk `d`, if cached.
    #[inline]
    pub fn get_map(&self, d: &Digest) -> Option<Bytes> {
        self.maps.get(d)
    }

    /// Cache the mapping `map` of chunk `d` (keeping an already cached one); returns the
    /// cached one.
    pub fn insert_map(&self, d: Digest, map: Bytes) -> Bytes {
        self.maps.insert(d, map)
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the hot path may read local chunk files.
const MODE_NOWAIT: u8 = 0;
const MODE_PLAIN: u8 = 1;
const MODE_NONE: u8 = 2;

/// A read-only image: a manifest over chunks in a store.
pub struct Image {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    manifest_key: String,
    manifest: Arc<Manifest>,
    chunk_shift: u32,
    /// Set for images read through the chunk cache (remote stores, raw objects).
    cached: Option<Arc<CachedImage>>,
    /// Whether the store has local files (`Store::local_path`).
    local: bool,
    fds: Arc<FdCache>,
    /// MODE_*: what `try_read_nowait` does.
    mode: AtomicU8,
    /// Whether `openat2(RESOLVE_CACHED)` works here (cleared on ENOSYS/EINVAL).
    cached_open: AtomicBool,
}

impl Image {
    /// Load the manifest `manifest_key` from `store` and open the image for reading.
    pub async fn open(store: Arc<dyn Store>, manifest_key: &str) -> Result<Arc<Image>, ImageError> {
        let fds = Arc::new(FdCache::new(DEFAULT_FD_CACHE_CAPACITY));
        Image::open_with_fd_cache(store, manifest_key, fds).await
    }

    /// Like [`Image::open`], sharing `fds` with other images (chunk files are shared by
    /// digest, so images with common chunks share their open files too).
    pub async fn open_with_fd_cache(
        store: Arc<dyn Store>,
        manifest_key: &str,
        fds: Arc<FdCache>,
    ) -> Result<Arc<Image>, ImageError> {
        let bytes = store.get(manifest_key).await?;
        let manifest = Manifest::decode(&bytes).map_err(|source| ImageError::Manifest {
            key: manifest_key.to_string(),
            source,
        })?;
        let local_dir = store.local_path(manifest_key);
        let mode = match &local_dir {
            None => MODE_NONE,
            Some(p) if crate::sys::is_memory_fs(p.parent().unwrap_or(p)) => MODE_PLAIN,
            Some(_) => MODE_NOWAIT,
        };
        Ok(Arc::new(Image {
            inner: Arc::new(Inner {
                store,
                manifest_key: manifest_key.to_string(),
                chunk_shift: manifest.chunk_size().trailing_zeros(),
                manifest: Arc::new(manifest),
                cached: None,
                local: local_dir.is_some(),
                fds,
                mode: AtomicU8::new(mode),
                cached_open: AtomicBool::new(true),
            }),
        }))
    }

    /// Open a native image whose chunks are in a (remote) `store`, read through `cache`
    /// under `cache_key` (the image id): chunks are fetched on first read, verified against
    /// their digests, and kept.
    pub async fn open_cached(
        store: Arc<dyn Store>,
        manifest_key: &str,
        cache: &ChunkCache,
        cache_key: &str,
    ) -> Result<Arc<Image>, ImageError> {
        let bytes = store.get(manifest_key).await?;
        let manifest = Manifest::decode(&bytes).map_err(|source| ImageError::Manifest {
            key: manifest_key.to_string(),
            source,
        })?;
        let manifest = Arc::new(manifest);
        let source = Arc::new(ManifestSource::new(store.clone(), manifest.clone()));
        Image::with_cache(store, manifest_key, manifest, source, cache, cache_key)
    }

    /// Open a raw image object `object_key` of `size` bytes in `store`, read by range in
    /// chunks of `chunk_size` through `cache` under `cache_key`.
    pub fn open_object(
        store: Arc<dyn Store>,
        object_key: &str,
        size: u64,
        chunk_size: u32,
        cache: &ChunkCache,
        cache_key: &str,
    ) -> Result<Arc<Image>, ImageError> {
        if !super::manifest::valid_chunk_size(chunk_size) {
            return Err(ImageError::InvalidChunkSize { chunk_size });
        }
        let n = size.div_ceil(chunk_size as u64);
        let manifest =
            Manifest::from_entries(size, chunk_size, (0..n).map(|_| Some(Digest([0; 32]))))
                .map_err(|source| ImageError::Manifest {
                    key: object_key.to_string(),
                    source,
                })?;
        let source = Arc::new(ObjectSource::new(
            store.clone(),
            object_key.to_string(),
            chunk_size,
        ));
        Image::with_cache(
            store,
            object_key,
            Arc::new(manifest),
            source,
            cache,
            cache_key,
        )
    }

    fn with_cache(
        store: Arc<dyn Store>,
        key: &str,
        manifest: Arc<Manifest>,
        source: Arc<dyn crate::cache::ChunkSource>,
        cache: &ChunkCache,
        cache_key: &str,
    ) -> Result<Arc<Image>, ImageError> {
        let cached = cache
            .open_image(cache_key, manifest.size(), manifest.chunk_size(), source)
            .map_err(|e| {
                ImageError::Internal(format!("cannot open the cache of {cache_key}: {e}"))
            })?;
        Ok(Arc::new(Image {
            inner: Arc::new(Inner {
                store,
                manifest_key: key.to_string(),
                chunk_shift: manifest.chunk_size().trailing_zeros(),
                manifest,
                cached: Some(cached),
                local: false,
                fds: Arc::new(FdCache::new(SHARDS)),
                mode: AtomicU8::new(MODE_NONE),
                cached_open: AtomicBool::new(false),
            }),
        }))
    }

    /// The image's chunk cache, for images read through one.
    pub fn cached(&self) -> Option<&Arc<CachedImage>> {
        self.inner.cached.as_ref()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    pub fn manifest_key(&self) -> &str {
        &self.inner.manifest_key
    }

    /// Whether `try_read_nowait` can serve reads (false for remote stores and for local
    /// file systems without `RWF_NOWAIT` support).
    pub fn has_nowait_path(&self) -> bool {
        self.inner.mode.load(Ordering::Relaxed) != MODE_NONE
    }
}

/// Outcome of a non-blocking open.
enum OpenCached {
    Opened(File),
    WouldBlock,
    Unsupported,
}

/// Open `path` read-only if its lookup needs no disk I/O (`openat2` with `RESOLVE_CACHED`).
fn open_cached(path: &Path) -> OpenCached {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return OpenCached::WouldBlock;
    };
    // SAFETY: open_how is a plain C struct of integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_CACHED;
    // SAFETY: openat2 reads the NUL-terminated path `c` and `size_of::<open_how>()` bytes of
    // `how`; both outlive the call. It returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::E2BIG) => OpenCached::Unsupported,
            // EAGAIN (lookup needs I/O) or a real error: the blocking path retries and reports.
            _ => OpenCached::WouldBlock,
        };
    }
    let Ok(fd) = i32::try_from(fd) else {
        return OpenCached::WouldBlock;
    };
    // SAFETY: `fd` was just returned by openat2, is open, and nothing else owns it.
    OpenCached::Opened(unsafe { File::from_raw_fd(fd) })
}

/// Outcome of one non-blocking positional read.
enum Nowait {
    Done,
    WouldBlock,
    Unsupported,
    Failed(io::Error),
}

/// Read all of `buf` at `offset` of `file` without blocking, or say why not. `plain`: the
/// file is in memory (tmpfs), where a plain `pread` never waits for a device.
#[inline]
fn pread_nowait(file: &File, buf: &mut [u8], offset: u64, plain: bool) -> Nowait {
    if plain {
        return match file.read_at(buf, offset) {
            Ok(n) if n == buf.len() => Nowait::Done,
            // A truncated chunk file: the blocking path reports it.
            Ok(_) => Nowait::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Nowait::WouldBlock,
            Err(e) => Nowait::Failed(e),
        };
    }
    match crate::sys::pread_nowait(file, buf, offset) {
        Ok(NoWait::Done) => Nowait::Done,
        Ok(NoWait::WouldBlock) => Nowait::WouldBlock,
        Ok(NoWait::Unsupported) => Nowait::Unsupported,
        Err(e) => Nowait::Failed(e),
    }
}

impl Inner {
    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.manifest.size() => Ok(()),
            _ => Err(errno_error(libc::EINVAL)),
        }
    }

    /// The pieces of `offset .. offset+len`: (chunk index, offset in chunk, len).
    #[inline]
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
        let mask = (1u64 << self.chunk_shift) - 1;
        let end = offset + len as u64;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let index = pos >> self.chunk_shift;
            let within = pos & mask;
            let n = ((mask + 1 - within).min(end - pos)) as usize;
            let piece = (index, within, n);
            pos += n as u64;
            Some(piece)
        })
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if let Some(cached) = &self.cached {
            return self.try_read_cached(cached, offset, buf);
        }
        let mode = self.mode.load(Ordering::Relaxed);
        if mode == MODE_NONE {
            return None;
        }
        if let Err(e) = self.check_range(offset, buf.len()) {
            return Some(Err(e));
        }
        let mut done = 0;
        for (index, within, n) in self.pieces(offset, buf.len()) {
            let piece = &mut buf[done..done + n];
            done += n;
            let Some(digest) = self.manifest.chunk(index) else {
                piece.fill(0);
                continue;
            };
            let file = match self.fds.get(digest) {
                Some(f) => f,
                None => self.open_nowait(index, digest)?,
            };
            match pread_nowait(&file, piece, within, mode == MODE_PLAIN) {
                Nowait::Done => {}
                Nowait::WouldBlock => return None,
                Nowait::Unsupported => {
                    self.mode.store(MODE_NONE, Ordering::Relaxed);
                    return None;
                }
                Nowait::Failed(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    /// The zero-copy hot path, for chunk files on a memory file system only (`MODE_PLAIN`):
    /// data pieces are views of the chunk files mapped whole with `MAP_POPULATE`, which
    /// never wait for a device there. Elsewhere a page fault on a mapping could block the
    /// connection's thread on disk I/O, so other file systems keep the `RWF_NOWAIT` copy
    /// path. Chunk files are immutable (content-addressed, written via temp + rename) and
    /// only ever unlinked, so a mapping can neither change nor `SIGBUS`.
    fn try_read_mapped(
        &self,
        offset: u64,
        len: usize,
        out: &mut Vec<MappedPiece>,
    ) -> Option<io::Result<()>> {
        if self.cached.is_some() || self.mode.load(Ordering::Relaxed) != MODE_PLAIN {
            return None;
        }
        if let Err(e) = self.check_range(offset, len) {
            return Some(Err(e));
        }
        for (index, within, n) in self.pieces(offset, len) {
            let Some(digest) = self.manifest.chunk(index) else {
                match out.last_mut() {
                    Some(MappedPiece::Zero(z)) => *z += n,
                    _ => out.push(MappedPiece::Zero(n)),
                }
                continue;
            };
            let map = match self.fds.get_map(digest) {
                Some(m) => m,
                None => self.map_nowait(index, digest)?,
            };
            let within = within as usize;
            if within + n > map.len() {
                // Cannot happen (sizes are checked when mapping): let the slow path report.
                return None;
            }
            out.push(MappedPiece::Data(map.slice(within..within + n)));
        }
        Some(Ok(()))
    }

    /// Map and cache data chunk `index` (memory file systems only), or `None`.
    #[cold]
    fn map_nowait(&self, index: u64, digest: &Digest) -> Option<Bytes> {
        let file = match self.fds.get(digest) {
            Some(f) => f,
            None => self.open_nowait(index, digest)?,
        };
        let len = usize::try_from(self.manifest.chunk_len(index)).ok()?;
        if file.metadata().ok()?.len() != len as u64 {
            return None;
        }
        let map = crate::sys::Mapping::map_immutable(&file, len).ok()?;
        Some(self.fds.insert_map(*digest, Bytes::from_owner(map)))
    }

    /// The hot path of cached images: every piece from the page cache, or `None`.
    fn try_read_cached(
        &self,
        cached: &CachedImage,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<io::Result<()>> {
        if let Err(e) = self.check_range(offset, buf.len()) {
            return Some(Err(e));
        }
        let mut done = 0;
        for (index, within, n) in self.pieces(offset, buf.len()) {
            let piece = &mut buf[done..done + n];
            done += n;
            if self.manifest.is_hole(index) {
                piece.fill(0);
                continue;
            }
            if let Err(e) = cached.try_read(index, within as usize, piece)? {
                return Some(Err(e));
            }
        }
        Some(Ok(()))
    }

    /// Read through the chunk cache, fetching what is missing; the chunks of one request
    /// are fetched concurrently.
    async fn read_cached(
        &self,
        cached: &Arc<CachedImage>,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let mut rest = buf;
        let mut reads = Vec::new();
        for (index, within, n) in self.pieces(offset, rest.len()) {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            if self.manifest.is_hole(index) {
                piece.fill(0);
                continue;
            }
            reads.push(async move { cached.read(index, within as usize, piece).await });
        }
        futures::future::try_join_all(reads).await.map_err(|e| {
            tracing::warn!(image = %cached.key(), error = %crate::error::chain(&e), "read failed");
            errno_error(crate::error::Classify::kind(&e).errno())
        })?;
        Ok(())
    }

    /// Open and cache data chunk `index` without blocking, or `None`.
    #[cold]
    fn open_nowait(&self, index: u64, digest: &Digest) -> Option<Arc<File>> {
        if !self.cached_open.load(Ordering::Relaxed) {
            return None;
        }
        let path = self.store.local_path(&chunk_key(digest))?;
        let file = match open_cached(&path) {
            OpenCached::Opened(f) => f,
            OpenCached::WouldBlock => return None,
            OpenCached::Unsupported => {
                self.cached_open.store(false, Ordering::Relaxed);
                return None;
            }
        };
        // fstat does no I/O. A wrong size is reported by the blocking path.
        if file.metadata().ok()?.len() != self.manifest.chunk_len(index) {
            return None;
        }
        Some(self.fds.insert(*digest, Arc::new(file)))
    }

    /// The open file of data chunk `index`, opening and caching it if needed (blocking).
    fn chunk_file(&self, index: u64, digest: &Digest) -> io::Result<Arc<File>> {
        if let Some(f) = self.fds.get(digest) {
            return Ok(f);
        }
        let key = chunk_key(digest);
        let path = self
            .store
            .local_path(&key)
            .ok_or_else(|| io::Error::other("store has no local path"))?;
        // A missing or unreadable chunk is an I/O error of the device, not ENOENT.
        let file = File::open(&path).map_err(|e| {
            tracing::error!(chunk = %key, error = &e as &dyn std::error::Error, "cannot open chunk");
            errno_error(libc::EIO)
        })?;
        let size = file.metadata()?.len();
        let expected = self.manifest.chunk_len(index);
        if size != expected {
            tracing::error!(chunk = %key, size, expected, "chunk file has the wrong size");
            return Err(errno_error(libc::EIO));
        }
        Ok(self.fds.insert(*digest, Arc::new(file)))
    }

    /// Read from local chunk files, blocking. `buf` is zero-filled for holes.
    fn read_local_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        for (index, within, n) in self.pieces(offset, buf.len()) {
            let piece = &mut buf[done..done + n];
            done += n;
            match self.manifest.chunk(index) {
                None => piece.fill(0),
                Some(digest) => {
                    let file = self.chunk_file(index, digest)?;
                    file.read_exact_at(piece, within).map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            errno_error(libc::EIO)
                        } else {
                            e
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Read through `Store::get_range` (stores without local files).
    async fn read_remote(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        let pieces: Vec<_> = self.pieces(offset, buf.len()).collect();
        for (index, within, n) in pieces {
            let piece = &mut buf[done..done + n];
            done += n;
            match self.manifest.chunk(index) {
                None => piece.fill(0),
                Some(digest) => {
                    let key = chunk_key(digest);
                    let data = self
                        .store
                        .get_range(&key, within..within + n as u64)
                        .await
                        .map_err(|e| {
                            tracing::warn!(chunk = %key, error = &e as &dyn std::error::Error, "chunk read failed");
                            io::Error::other(e)
                        })?;
                    if data.len() != n {
                        return Err(errno_error(libc::EIO));
                    }
                    piece.copy_from_slice(&data);
                }
            }
        }
        Ok(())
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.inner.manifest.size()
    }

    #[inline]
    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.inner.try_read_nowait(offset, buf)
    }

    #[inline]
    fn try_read_mapped(
        &self,
        offset: u64,
        len: usize,
        out: &mut Vec<MappedPiece>,
    ) -> Option<io::Result<()>> {
        self.inner.try_read_mapped(offset, len, out)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.check_range(offset, buf.len())?;
            if let Some(cached) = &inner.cached {
                return inner.read_cached(cached, offset, buf).await;
            }
            if !inner.local {
                return inner.read_remote(offset, buf).await;
            }
            // The blocking task cannot borrow `buf` (this future may be dropped while it
            // runs), so it reads into its own buffer and we copy.
            let len = buf.len();
            let task_inner = Arc::clone(inner);
            let data = tokio::task::spawn_blocking(move || {
                let mut v = vec![0u8; len];
                task_inner.read_local_blocking(offset, &mut v).map(|()| v)
            })
            .await
            .map_err(|e| io::Error::other(format!("read task failed: {e}")))??;
            buf.copy_from_slice(&data);
            Ok(())
        })
    }

    fn cache<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let Some(cached) = &self.inner.cached else {
                return Ok(());
            };
            let end = offset.saturating_add(len).min(self.size());
            if offset >= end {
                return Ok(());
            }
            let shift = self.inner.chunk_shift;
            cached
                .prefetch(offset >> shift, (end - 1) >> shift)
                .await
                .map_err(|e| errno_error(crate::error::Classify::kind(&e).errno()))
        })
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Vec<Extent> {
        let m = &self.inner.manifest;
        let end = offset.saturating_add(len).min(m.size());
        let mut out: Vec<Extent> = Vec::new();
        if offset >= end || max_extents == 0 {
            return out;
        }
        let shift = self.inner.chunk_shift;
        let mut index = offset >> shift;
        let mut pos = offset;
        while pos < end {
            let chunk_end = ((index + 1) << shift).min(end);
            let kind = if m.is_hole(index) {
                ExtentKind::Hole
            } else {
                ExtentKind::Data
            };
            let residency = match &self.inner.cached {
                Some(c) if kind == ExtentKind::Data && !c.is_cached(index) => Residency::Remote,
                _ => Residency::Local,
            };
            let count = out.len();
            match out.last_mut() {
                Some(last) if last.kind == kind && last.residency == residency => {
                    last.len += chunk_end - pos
                }
                _ if count == max_extents => break,
                _ => out.push(Extent {
                    offset: pos,
                    len: chunk_end - pos,
                    kind,
                    residency,
                }),
            }
            pos = chunk_end;
            index += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_cache_evicts_when_full_and_keeps_recent() {
        let dir = super::super::testutil::tempdir();
        let cache = FdCache::new(SHARDS); // one per shard
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let mut d = [0u8; 32];
            d[0] = i;
            // Same shard (d[31] == 0).
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, [i]).unwrap();
            let digest = Digest(d);
            cache.insert(digest, Arc::new(File::open(&p).unwrap()));
            digests.push(digest);
        }
        assert!(cache.get(&digests[0]).is_none());
        assert!(cache.get(&digests[1]).is_none());
        assert!(cache.get(&digests[2]).is_some());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn raise_fd_limit_reaches_hard_limit() {
        let soft = crate::sys::raise_fd_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit for the call.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(soft, lim.rlim_max);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }
}
