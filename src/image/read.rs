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
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use parking_lot::Mutex;

use super::{chunk_key, ImageError, Manifest};
use crate::device::{errno_error, BlockDevice, Extent, ExtentKind, Residency};
use crate::store::Store;
use crate::types::Digest;

/// Open chunk files the default [`FdCache`] keeps.
pub const DEFAULT_FD_CACHE_CAPACITY: usize = 4096;

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit (call once at start-up).
/// Returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read above, with cur <= max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

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

/// A bounded cache of open chunk files, keyed by digest, shareable between images.
///
/// Sharded by digest; each shard evicts with the clock algorithm (an entry used since the
/// hand last passed gets a second chance). Evicted files close when the last reader using
/// them drops its `Arc`.
pub struct FdCache {
    shards: [CachePadded<Mutex<Shard>>; SHARDS],
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

#[derive(Default)]
struct Shard {
    map: DigestMap<usize>,
    slots: Vec<Slot>,
    hand: usize,
}

struct Slot {
    digest: Digest,
    file: Arc<File>,
    referenced: bool,
}

impl FdCache {
    /// A cache holding up to about `capacity` open files (at least one per shard).
    pub fn new(capacity: usize) -> FdCache {
        FdCache {
            shards: std::array::from_fn(|_| CachePadded(Mutex::new(Shard::default()))),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    #[inline]
    fn shard(&self, d: &Digest) -> &Mutex<Shard> {
        &self.shards[usize::from(d.0[31]) % SHARDS]
    }

    /// The open file of chunk `d`, if cached.
    #[inline]
    pub fn get(&self, d: &Digest) -> Option<Arc<File>> {
        let mut shard = self.shard(d).lock();
        let i = *shard.map.get(d)?;
        let slot = &mut shard.slots[i];
        slot.referenced = true;
        Some(Arc::clone(&slot.file))
    }

    /// Cache `file` for `d` (keeping an already cached one); returns the cached file.
    pub fn insert(&self, d: Digest, file: Arc<File>) -> Arc<File> {
        let mut guard = self.shard(&d).lock();
        let shard = &mut *guard;
        if let Some(&i) = shard.map.get(&d) {
            return Arc::clone(&shard.slots[i].file);
        }
        let slot = Slot {
            digest: d,
            file: Arc::clone(&file),
            referenced: false,
        };
        if shard.slots.len() < self.per_shard {
            shard.map.insert(d, shard.slots.len());
            shard.slots.push(slot);
            return file;
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
            return file;
        }
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().slots.len()).sum()
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
    manifest: Manifest,
    chunk_shift: u32,
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
            Some(p) if is_memory_fs(p) => MODE_PLAIN,
            Some(_) => MODE_NOWAIT,
        };
        Ok(Arc::new(Image {
            inner: Arc::new(Inner {
                store,
                manifest_key: manifest_key.to_string(),
                chunk_shift: manifest.chunk_size().trailing_zeros(),
                manifest,
                local: local_dir.is_some(),
                fds,
                mode: AtomicU8::new(mode),
                cached_open: AtomicBool::new(true),
            }),
        }))
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

/// Whether `path` is on tmpfs or ramfs, whose reads never wait for a device.
fn is_memory_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(path);
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs, both live for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    t == TMPFS_MAGIC || t == RAMFS_MAGIC
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

/// Read all of `buf` at `offset` of `file` without blocking, or say why not.
#[inline]
fn pread_nowait(file: &File, buf: &mut [u8], offset: u64, plain: bool) -> Nowait {
    let n = if plain {
        match file.read_at(buf, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Nowait::WouldBlock,
            Err(e) => return Nowait::Failed(e),
        }
    } else {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Nowait::Failed(errno_error(libc::EINVAL));
        };
        // SAFETY: `iov` describes exactly `buf`, which is valid and exclusively borrowed for
        // the call; `file` keeps the fd open; the kernel writes at most `iov_len` bytes.
        let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Nowait::WouldBlock,
                Some(libc::EOPNOTSUPP) => Nowait::Unsupported,
                _ => Nowait::Failed(e),
            };
        }
        r as usize
    };
    if n == buf.len() {
        Nowait::Done
    } else {
        // Partly cached, or a truncated chunk file: the blocking path tells which.
        Nowait::WouldBlock
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

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.check_range(offset, buf.len())?;
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
            let count = out.len();
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += chunk_end - pos,
                _ if count == max_extents => break,
                _ => out.push(Extent {
                    offset: pos,
                    len: chunk_end - pos,
                    kind,
                    residency: Residency::Local,
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
        let soft = raise_fd_limit().unwrap();
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
