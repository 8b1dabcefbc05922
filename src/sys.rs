//! Thin, safe wrappers over the positioned-I/O system calls the data path needs.
//!
//! Every `unsafe` block of the data path lives here, each with its SAFETY argument.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

/// Outcome of a non-blocking positioned read.
#[derive(Debug)]
pub enum NoWait {
    /// `buf` is filled.
    Done,
    /// The data is not in the page cache: reading would block.
    WouldBlock,
    /// The file system does not support `RWF_NOWAIT`.
    Unsupported,
}

/// Fill `buf` from `file` at `offset` with `preadv2(RWF_NOWAIT)`, never blocking on disk.
///
/// A short read (end of file, or part of the range not cached) is reported as `WouldBlock`
/// after the bytes read so far are discarded, except a read that hits end of file, which is
/// `UnexpectedEof`.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<NoWait> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` points into `rest`, a live, exclusively borrowed buffer of `iov_len`
        // bytes; the kernel writes at most that many bytes; the fd is open for the call.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) => Ok(NoWait::WouldBlock),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    Ok(NoWait::Unsupported)
                }
                Some(libc::EINTR) => continue,
                _ => Err(err),
            };
        }
        if n == 0 {
            if done == 0 && rest.is_empty() {
                break;
            }
            // End of file before the buffer is full, or nothing cached at this point.
            return Ok(NoWait::WouldBlock);
        }
        done += n as usize;
    }
    Ok(NoWait::Done)
}

/// Fill `buf` from `file` at `offset`, blocking; a file too short is `UnexpectedEof`.
pub fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// Write all of `buf` to `file` at `offset`, blocking.
pub fn pwrite_all(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// Deallocate `offset .. offset+len` of `file`, keeping its size; reads of it give zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate(2) on an open fd with plain integer arguments; no memory is shared.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a `statfs` result is a memory file system (tmpfs, ramfs): reads there never wait
/// for a device, and such file systems may reject `RWF_NOWAIT`, so callers use plain `pread`.
fn is_memory_statfs(st: &libc::statfs) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    t == TMPFS_MAGIC || t == RAMFS_MAGIC
}

/// Whether `dir` is on a memory file system (see [`is_memory_backed`]).
pub fn is_memory_fs(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs, both live for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    is_memory_statfs(&st)
}

/// Whether `file` lives on a memory file system (tmpfs, ramfs), where a read never waits for a
/// device. Such file systems may not support `RWF_NOWAIT`, yet blocking reads of them are
/// as fast as non-blocking ones.
pub fn is_memory_backed(file: &File) -> bool {
    // SAFETY: all-zero bytes are a valid `statfs` (plain integers).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, a valid, exclusively borrowed struct; the fd is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    is_memory_statfs(&st)
}

/// The total size in bytes of the file system holding `path`.
pub fn fs_total_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs, both live for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_blocks as u64 * st.f_frsize as u64)
}

/// A read-only shared mapping of a whole file, unmapped on drop.
///
/// Only for files that are never modified or truncated while mapped: a file shrinking
/// under a mapping turns reads of the lost pages into `SIGBUS`, and writes to it would
/// change bytes behind a `&[u8]`. Content-addressed chunk files qualify: they are written
/// to a temporary name and renamed into place, never changed afterwards, and only ever
/// unlinked (an unlinked file stays valid while mapped).
pub struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only memory owned by this value; sharing `&[u8]` views of it
// between threads is as safe as sharing any immutable byte slice.
unsafe impl Send for Mapping {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map all `len` bytes of `file` read-only, with the pages populated up front
    /// (`MAP_POPULATE`), so reading the mapping does not fault page by page. The caller
    /// guarantees the file is immutable (see the type's docs) and `len` is its size.
    /// `len == 0` is an error (`EINVAL`), as for mmap(2).
    pub fn map_immutable(file: &File, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping (addr NULL) of an open fd; it aliases no Rust memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Mapping { ptr, len })
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr .. ptr+len` is a live PROT_READ mapping owned by `self` (unmapped
        // only in drop); the file behind it is never modified or truncated (type docs).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr/len` is exactly the mapping made in `map_immutable`, unmapped once;
        // no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Size of one [`FileMemory`] segment: a segment is mapped whole the first time a byte of
/// it is asked for, and stays mapped (at a fixed address) until the `FileMemory` is dropped.
pub const FILE_MEMORY_SEGMENT: u64 = 1 << 30;

/// Writable shared mappings of a file on a memory file system, made segment by segment on
/// demand, so that data received from a socket can land in the file's pages with one copy.
///
/// Only for files on tmpfs/ramfs ([`is_memory_backed`]): there a store to a page whose
/// blocks were allocated first ([`FileMemory::allocate`]) can never fault with `SIGBUS` (no
/// device I/O, no allocation at fault time). Callers never shrink the file while it is
/// mapped (a shrink would turn the lost pages into `SIGBUS`), and punch holes only into
/// ranges no one is writing through the mapping.
pub struct FileMemory {
    fd: RawFd,
    segments: parking_lot::Mutex<Vec<Option<std::ptr::NonNull<u8>>>>,
    /// The file is known to be at least this long (it never shrinks while mapped).
    known_len: std::sync::atomic::AtomicU64,
}

// SAFETY: the segments are shared mappings owned by this value; the raw pointers are only
// handed out by `map`, whose callers uphold its contract. Nothing is thread-bound.
unsafe impl Send for FileMemory {}
// SAFETY: as above; the segment table is behind a mutex.
unsafe impl Sync for FileMemory {}

impl FileMemory {
    /// Mappings of `file` (whose fd must stay open for the life of this value: the owner
    /// keeps the `File` next to it).
    pub fn new(file: &File) -> FileMemory {
        FileMemory {
            fd: file.as_raw_fd(),
            segments: parking_lot::Mutex::new(Vec::new()),
            known_len: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Allocate the file's blocks at `offset .. offset+len` (growing the file if needed)
    /// and map them, so that stores to that memory can neither fault for lack of space nor
    /// fault at all: `MADV_POPULATE_WRITE` does it in one call (a full file system is an
    /// error, never a `SIGBUS`); kernels without it get `fallocate` and fault page by page
    /// later. `ENOSPC` (or `ENOMEM`/`EFAULT`) when the file system is full. Cheap for blocks
    /// already allocated and mapped. Same range rules as [`FileMemory::map`].
    pub fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        use std::sync::atomic::Ordering;
        // The file must cover the range before its pages can be populated.
        let end = offset + len;
        if self.known_len.load(Ordering::Acquire) < end {
            // Under the segment lock, so two growers cannot undo each other (`pwrite`s by
            // others only ever grow the file).
            let _segs = self.segments.lock();
            // SAFETY: fstat into a zeroed struct owned here; the fd is open.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstat(self.fd, &mut st) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let size = st.st_size as u64;
            // SAFETY: ftruncate(2) growing an open fd (size < end); no memory is shared.
            if size < end && unsafe { libc::ftruncate(self.fd, end as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
            self.known_len.fetch_max(end.max(size), Ordering::AcqRel);
        }
        let ptr = self.map(offset, len)?;
        // SAFETY: `ptr .. ptr+len` lies inside a live shared mapping of this file (`map`),
        // within the file's size; populating only allocates and maps its pages.
        let r = unsafe { libc::madvise(ptr.as_ptr().cast(), len as usize, MADV_POPULATE_WRITE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        // SAFETY: fallocate(2) on an open fd with integer arguments; no memory is shared.
        if unsafe { libc::fallocate(self.fd, 0, offset as libc::off_t, len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A pointer to the file's bytes at `offset .. offset+len` in memory, which must be
    /// allocated ([`FileMemory::allocate`]) and must not cross a [`FILE_MEMORY_SEGMENT`]
    /// boundary.
    ///
    /// The pointer stays valid while `self` lives; writing through it is sound as long as
    /// no one else reads or writes the range meanwhile (the caller owns those blocks).
    pub fn map(&self, offset: u64, len: u64) -> io::Result<std::ptr::NonNull<u8>> {
        let seg = offset / FILE_MEMORY_SEGMENT;
        if len == 0 || (offset + len - 1) / FILE_MEMORY_SEGMENT != seg {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut segs = self.segments.lock();
        let i = seg as usize;
        if segs.len() <= i {
            segs.resize(i + 1, None);
        }
        let base = match segs[i] {
            Some(p) => p,
            None => {
                // SAFETY: a fresh shared mapping (addr NULL) of an open fd; it aliases no
                // Rust memory. Pages past the end of the file are never touched (see type).
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        FILE_MEMORY_SEGMENT as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        self.fd,
                        (seg * FILE_MEMORY_SEGMENT) as libc::off_t,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(io::Error::last_os_error());
                }
                let p = std::ptr::NonNull::new(p.cast::<u8>())
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
                segs[i] = Some(p);
                p
            }
        };
        // SAFETY: `offset % SEGMENT < SEGMENT`, inside the segment's mapping.
        Ok(unsafe { base.add((offset % FILE_MEMORY_SEGMENT) as usize) })
    }
}

impl Drop for FileMemory {
    fn drop(&mut self) {
        for p in self.segments.get_mut().iter().flatten() {
            // SAFETY: each pointer is a whole segment mapped in `map`, unmapped once;
            // pointers handed out do not outlive `self` (see `map`).
            unsafe {
                libc::munmap(p.as_ptr().cast(), FILE_MEMORY_SEGMENT as usize);
            }
        }
    }
}

/// Raise the soft limit of open files to the hard limit (the cache and the local store keep
/// many files open). Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, a valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads `want`, a valid struct; raising the soft limit up to the
        // hard limit is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pread_nowait_reads_cached_data_or_says_why_not() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let f = File::open(&p).unwrap();
        let mut buf = vec![0u8; 4096];
        match pread_nowait(&f, &mut buf, 4096).unwrap() {
            NoWait::Done => assert!(buf.iter().all(|&b| b == 7)),
            NoWait::WouldBlock | NoWait::Unsupported => {}
        }
        // Past the end: never Done.
        let mut buf = vec![0u8; 10];
        assert!(!matches!(
            pread_nowait(&f, &mut buf, 8190).unwrap(),
            NoWait::Done
        ));
    }

    #[test]
    fn mapping_shows_the_file_and_outlives_unlink() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let m = Mapping::map_immutable(&f, data.len()).unwrap();
        drop(f);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(m.as_ref(), &data[..]);
        assert!(Mapping::map_immutable(&File::open(dir.path()).unwrap(), 0).is_err());
    }

    #[test]
    fn punch_hole_makes_range_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![9u8; 65536]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        punch_hole(&f, 4096, 8192).unwrap();
        let mut buf = vec![1u8; 8192];
        pread_exact(&f, &mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(f.metadata().unwrap().len(), 65536);
    }
}
