//! A volume as the data path sees it: [`VolumeDevice`] (an [`OverlayVolume`] that notes guest
//! activity) and [`flatten`], which copies every base block into the overlay in the
//! background so the volume stops needing its image.
//!
//! Invariants: all connections to one volume share one `VolumeDevice` (so one overlay, and a
//! FLUSH on any connection covers writes acknowledged on all); flattening only ever fills
//! blocks still in the `Base` state ([`Overlay::hydrate`]), so a racing guest write wins, and
//! fills them in the snapshots too, so a flattened volume's snapshots (revert, clone, image
//! from a snapshot) never need the image either.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::device::{errno_error, BlockDevice, Extent, ExtentKind, Residency, WritableDevice};
use crate::overlay::volume::OverlayVolume;
use crate::overlay::Overlay;

/// An overlay volume served to clients; counts guest requests so background work can give
/// way to them.
pub struct VolumeDevice {
    inner: OverlayVolume,
    base: Arc<dyn BlockDevice>,
    /// Guest requests so far (reads and writes).
    io_count: AtomicU64,
}

impl VolumeDevice {
    pub fn new(overlay: Arc<Overlay>, base: Arc<dyn BlockDevice>) -> VolumeDevice {
        VolumeDevice {
            inner: OverlayVolume::new(overlay, base.clone()),
            base,
            io_count: AtomicU64::new(0),
        }
    }

    pub fn overlay(&self) -> &Arc<Overlay> {
        self.inner.overlay()
    }

    pub fn base(&self) -> &Arc<dyn BlockDevice> {
        &self.base
    }

    /// Guest requests served so far.
    pub fn io_count(&self) -> u64 {
        self.io_count.load(Ordering::Relaxed)
    }

    fn note(&self) {
        self.io_count.fetch_add(1, Ordering::Relaxed);
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.note();
        self.inner.try_read_nowait(offset, buf)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        self.note();
        self.inner.read(offset, buf)
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Vec<Extent> {
        self.inner.extents(offset, len, max_extents)
    }

    fn cache<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, io::Result<()>> {
        self.inner.cache(offset, len)
    }

    fn writable(&self) -> Option<&dyn WritableDevice> {
        Some(self)
    }

    fn flush_covers_all_connections(&self) -> bool {
        self.inner.flush_covers_all_connections()
    }
}

impl WritableDevice for VolumeDevice {
    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> BoxFuture<'a, io::Result<()>> {
        self.note();
        self.inner.write(offset, data, fua)
    }

    fn landing(&self, offset: u64, len: u64) -> Option<Box<dyn crate::device::Landing>> {
        let l = self.inner.landing(offset, len)?;
        self.note();
        Some(l)
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        let r = self.inner.write_now(offset, data, fua)?;
        self.note();
        Some(r)
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        self.note();
        self.inner.trim(offset, len, fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        self.note();
        self.inner.write_zeroes(offset, len, may_punch, fua)
    }
}

/// The base of a flattened volume: it has none. Every block inside `len` is in the overlay,
/// so a read reaching here is a bug; it fails with EIO instead of inventing bytes.
pub struct NoBase {
    pub len: u64,
}

impl BlockDevice for NoBase {
    fn size(&self) -> u64 {
        self.len
    }

    fn try_read_nowait(&self, _offset: u64, _buf: &mut [u8]) -> Option<io::Result<()>> {
        Some(Err(errno_error(libc::EIO)))
    }

    fn read<'a>(&'a self, _offset: u64, _buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async { Err(errno_error(libc::EIO)) })
    }

    fn extents(&self, offset: u64, len: u64, _max: usize) -> Vec<Extent> {
        vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
            residency: Residency::Local,
        }]
    }
}

/// Progress of a flatten, shared between its task and `volume show`.
#[derive(Debug, Default)]
pub struct FlattenProgress {
    /// Bytes read from the base and offered to the overlay so far.
    pub done: AtomicU64,
    /// Bytes still reading from the base when the flatten started.
    pub total: AtomicU64,
    /// Set to stop the flatten early (volume deleted, daemon stopping).
    pub cancel: AtomicBool,
}

/// Flatten parameters.
#[derive(Debug, Clone, Copy)]
pub struct FlattenOptions {
    /// Bytes per second at most (0: unlimited).
    pub rate: u64,
    /// Bytes per step (read from the base, hydrate, flush at the end).
    pub step: u64,
    /// How long to pause when the guest did I/O during the last step.
    pub yield_pause: Duration,
}

impl Default for FlattenOptions {
    fn default() -> Self {
        FlattenOptions {
            rate: 0,
            step: 1 << 20,
            yield_pause: Duration::from_millis(5),
        }
    }
}

/// Copy every block of `dev` that still reads from its base (in the volume or in any of its
/// snapshots) into the overlay, then write a checkpoint.
/// Gives way to guest I/O (pauses while `dev.io_count()` moves) and keeps under
/// `opts.rate`. Returns `Ok(true)` when the volume no longer reads from its base, `Ok(false)`
/// when cancelled.
pub async fn flatten(
    dev: Arc<VolumeDevice>,
    opts: FlattenOptions,
    progress: Arc<FlattenProgress>,
) -> io::Result<bool> {
    let overlay = dev.overlay().clone();
    let remaining: u64 = overlay
        .unallocated_ranges(0, u64::MAX, usize::MAX)
        .iter()
        .map(|r| r.1)
        .sum();
    progress.total.store(remaining, Ordering::Relaxed);
    let start = Instant::now();
    let step = opts.step.max(crate::overlay::map::BLOCK);
    let mut pos = 0u64;
    let mut buf = Vec::new();
    loop {
        if progress.cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let Some((off, len)) = overlay.next_unallocated(pos, step) else {
            break;
        };
        let seen = dev.io_count();
        // Whole blocks (the last block of an unaligned base is padded with zeros).
        let block = crate::overlay::map::BLOCK;
        let whole = (off + len)
            .div_ceil(block)
            .saturating_mul(block)
            .min(overlay.size())
            - off;
        let from_base = len.min(dev.base().size().saturating_sub(off));
        buf.clear();
        buf.resize(whole as usize, 0);
        dev.base().read(off, &mut buf[..from_base as usize]).await?;
        let ov = overlay.clone();
        let data = std::mem::take(&mut buf);
        buf = tokio::task::spawn_blocking(move || ov.hydrate(off, &data).map(|_| data))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::from)?;
        pos = off + len;
        let done = progress.done.fetch_add(len, Ordering::Relaxed) + len;
        if opts.rate > 0 {
            let due = Duration::from_secs_f64(done as f64 / opts.rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        // Give way: while the guest is busy, pause between steps.
        let mut spins = 0;
        while dev.io_count() != seen && spins < 100 {
            let before = dev.io_count();
            tokio::time::sleep(opts.yield_pause).await;
            spins += 1;
            if dev.io_count() == before {
                break;
            }
        }
    }
    // A checkpoint, not just a flush: the snapshots' fills are not journaled.
    let ov = overlay.clone();
    tokio::task::spawn_blocking(move || ov.sync_all())
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::from)?;
    Ok(overlay.is_fully_allocated())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::volume::MemBase;

    fn base(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flatten_copies_base_and_keeps_guest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(3 << 20);
        let ov = Arc::new(Overlay::create_dir(dir.path(), 4 << 20, b.len() as u64).unwrap());
        let dev = Arc::new(VolumeDevice::new(ov.clone(), Arc::new(MemBase(b.clone()))));
        dev.writable()
            .unwrap()
            .write(5000, b"guest", false)
            .await
            .unwrap();
        let progress = Arc::new(FlattenProgress::default());

        let full = flatten(
            dev.clone(),
            FlattenOptions {
                step: 256 << 10,
                ..Default::default()
            },
            progress.clone(),
        )
        .await
        .unwrap();

        assert!(full);
        assert!(ov.is_fully_allocated());
        let flat = VolumeDevice::new(
            ov.clone(),
            Arc::new(NoBase {
                len: b.len() as u64,
            }),
        );
        let mut got = vec![0u8; 4 << 20];
        flat.read(0, &mut got).await.unwrap();
        let mut want = b.clone();
        want.resize(4 << 20, 0);
        want[5000..5005].copy_from_slice(b"guest");
        assert!(got == want, "flattened volume reads differ");
        assert!(progress.done.load(Ordering::Relaxed) >= progress.total.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flattened_snapshots_read_without_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(2 << 20);
        let ov = Arc::new(Overlay::create_dir(dir.path(), 2 << 20, b.len() as u64).unwrap());
        let dev = Arc::new(VolumeDevice::new(ov.clone(), Arc::new(MemBase(b.clone()))));
        let w = dev.writable().unwrap();
        w.write(0, &[1u8; 8192], false).await.unwrap();
        ov.snapshot("s").unwrap();
        w.write(1 << 20, &[2u8; 65536], false).await.unwrap();

        let full = flatten(dev.clone(), FlattenOptions::default(), Arc::default())
            .await
            .unwrap();

        assert!(full);
        ov.revert("s").unwrap();
        let flat = VolumeDevice::new(
            ov.clone(),
            Arc::new(NoBase {
                len: b.len() as u64,
            }),
        );
        let mut got = vec![0u8; 2 << 20];
        flat.read(0, &mut got).await.unwrap();
        let mut want = b.clone();
        want[..8192].fill(1);
        assert!(
            got == want,
            "the snapshot reads differently after the flatten"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_flatten_stops_early() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(1 << 20);
        let ov = Arc::new(Overlay::create_dir(dir.path(), 1 << 20, 1 << 20).unwrap());
        let dev = Arc::new(VolumeDevice::new(ov.clone(), Arc::new(MemBase(b))));
        let progress = Arc::new(FlattenProgress::default());
        progress.cancel.store(true, Ordering::Relaxed);

        let full = flatten(dev, FlattenOptions::default(), progress)
            .await
            .unwrap();

        assert!(!full);
        assert!(!ov.is_fully_allocated());
    }

    #[test]
    fn volume_device_offers_multi_conn() {
        let dir = tempfile::tempdir().unwrap();
        let ov = Arc::new(Overlay::create_dir(dir.path(), 1 << 20, 1 << 20).unwrap());
        let dev = VolumeDevice::new(ov, Arc::new(MemBase(vec![0; 1 << 20])));
        assert!(dev.writable().is_some());
        assert!(dev.flush_covers_all_connections());
    }
}
