//! The block-device interface every export serves.
//!
//! An image (read-only) implements [`BlockDevice`]; volumes (copy-on-write, a later issue)
//! will implement it too and additionally offer [`BlockDevice::writable`]. Front ends (NBD,
//! FUSE) only ever talk to this trait; they never look at the catalog per I/O.
//!
//! Errors are `std::io::Error`s whose raw OS error, when set, is the errno the front end
//! reports (`EIO`, `EINVAL`, `EPERM`, `ENOSPC`); anything else is reported as `EIO`.

use std::io;

use futures::future::BoxFuture;

/// How a byte range of a device is backed, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes are stored (may still read as zeros).
    Data,
    /// Nothing is stored; the range reads as zeros.
    Hole,
}

/// Where an extent's bytes are, as the `imgcache:residency` meta context reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// On this host's primary storage (local store, cache or overlay).
    Local,
    /// Only in a remote store; reading it needs a fetch.
    Remote,
    /// A volume's own bytes (its copy-on-write overlay), not the image's.
    Overlay,
}

/// One run of bytes with the same allocation (and residency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
    pub residency: Residency,
}

/// One part of a read served by [`BlockDevice::try_read_mapped`], in order.
#[derive(Debug, Clone)]
pub enum MappedPiece {
    /// These bytes, shared with the device (e.g. a view of a memory-mapped file); holding
    /// the `Bytes` keeps them valid and unchanged.
    Data(bytes::Bytes),
    /// This many bytes of a hole: they read as zeros.
    Zero(usize),
}

impl MappedPiece {
    pub fn len(&self) -> usize {
        match self {
            MappedPiece::Data(b) => b.len(),
            MappedPiece::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A virtual disk that can be read by offset.
///
/// Contract for every method taking `offset` and a length: the caller guarantees
/// `offset + len <= size()` (front ends reject out-of-range requests before calling); an
/// implementation may still return `EINVAL` for such a request, never panic. Reads are never
/// short: they fill the whole buffer or fail.
pub trait BlockDevice: Send + Sync + 'static {
    /// The virtual size in bytes. Constant for the lifetime of the handle.
    fn size(&self) -> u64;

    /// Serve a read without blocking the calling thread, if that is possible right now.
    ///
    /// Returns `None` when serving it would block (data not in page cache, chunk not local,
    /// a fetch needed); the caller then uses [`BlockDevice::read`]. `Some(result)` means the
    /// read is complete (successfully or not). This is the hot path of cached data: the NBD
    /// server calls it inline on its connection task.
    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>>;

    /// Zero-copy variant of [`BlockDevice::try_read_nowait`]: describe `offset .. offset+len`
    /// as pieces appended to `out` (covering exactly `len` bytes, in order) without copying
    /// the data, if that is possible right now without blocking.
    ///
    /// `None`: not possible (the default; the caller uses `try_read_nowait`/`read`), and
    /// anything appended to `out` is to be discarded. `Some(Err)` is a failed read.
    fn try_read_mapped(
        &self,
        offset: u64,
        len: usize,
        out: &mut Vec<MappedPiece>,
    ) -> Option<io::Result<()>> {
        let _ = (offset, len, out);
        None
    }

    /// Read `buf.len()` bytes at `offset`, blocking work done off the async runtime.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>>;

    /// The extents covering `offset .. offset+len`, in order, merged where adjacent extents
    /// have the same kind and residency. Answered from metadata only (no data I/O). The last
    /// extent may end before `offset+len` if `max_extents` were produced already.
    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Vec<Extent>;

    /// Hint that `offset .. offset+len` will be read soon (NBD_CMD_CACHE). Completing means
    /// the data is local, or that there is nothing to do.
    fn cache<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, io::Result<()>> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }

    /// The write interface, if this device accepts writes. Read-only devices return `None`
    /// and front ends answer writes with `EPERM`.
    fn writable(&self) -> Option<&dyn WritableDevice> {
        None
    }

    /// Whether a FLUSH on any connection makes the writes acknowledged on every connection
    /// to this device durable (NBD `CAN_MULTI_CONN` for a writable export). Read-only devices
    /// are always consistent across connections.
    fn flush_covers_all_connections(&self) -> bool {
        false
    }
}

/// The destination of one WRITE's payload in the device's own memory; see
/// [`WritableDevice::landing`].
pub trait Landing: Send {
    /// Where the payload's bytes from `filled` on go: a non-empty slice up to the end of the
    /// contiguous piece holding byte `filled` (empty once `filled == len`).
    fn room(&mut self, filled: usize) -> &mut [u8];
    /// As [`Landing::room`], as up to `max` slices covering the rest of the payload in
    /// order (for vectored reads; the memory need not be contiguous).
    fn rooms(&mut self, filled: usize, max: usize) -> Vec<io::IoSliceMut<'_>>;
    /// Make the whole payload the device's content at the landing's offset (as
    /// [`WritableDevice::write`] would; with `fua`, durable when it returns).
    fn commit(self: Box<Self>, fua: bool) -> io::Result<()>;
}

/// Writes on a device. Filled in by the copy-on-write volumes issue.
pub trait WritableDevice: Send + Sync {
    /// Write `data` at `offset`; with `fua`, durable before returning.
    fn write<'a>(&'a self, offset: u64, data: &'a [u8], fua: bool)
        -> BoxFuture<'a, io::Result<()>>;
    /// Write `data` at `offset` right now on the calling thread, if this device can do so
    /// cheaply (local primary storage, no waiting on anything remote), so the caller can
    /// pass its own buffer without copying it. `None`: nothing was written; use
    /// [`WritableDevice::write`]. Never starts work that outlives the call.
    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        let _ = (offset, data, fua);
        None
    }
    /// Memory a WRITE of `len` bytes at `offset` can be received into directly (from a
    /// socket: one copy instead of two), if this device offers it for this request. `None`:
    /// use [`WritableDevice::write`]. Nothing is written until [`Landing::commit`];
    /// dropping the landing writes nothing.
    fn landing(&self, offset: u64, len: u64) -> Option<Box<dyn Landing>> {
        let _ = (offset, len);
        None
    }
    /// Make every acknowledged write durable.
    fn flush(&self) -> BoxFuture<'_, io::Result<()>>;
    /// Forget `offset .. offset+len`; afterwards it reads as zeros.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, io::Result<()>>;
    /// Make `offset .. offset+len` read as zeros (`may_punch`: may deallocate).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> BoxFuture<'_, io::Result<()>>;
}

/// An `io::Error` carrying `errno`, for devices to return.
pub fn errno_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The errno a front end reports for `err`.
pub fn errno_of(err: &io::Error) -> i32 {
    match err.raw_os_error() {
        Some(e) if e > 0 => e,
        _ => crate::error::ErrorKind::of_io(err).errno(),
    }
}

pub mod mem;
