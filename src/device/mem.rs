//! An in-memory block device for tests and examples.
//!
//! [`MemDevice`] holds its bytes in a `Vec<u8>` and a list of metadata ranges: *holes*
//! (reported as [`ExtentKind::Hole`], read as zeros) and *remote* ranges (reported as
//! [`Residency::Remote`]; [`BlockDevice::try_read_nowait`] returns `None` for any read
//! touching them, so they exercise a front end's slow path). Optionally writable.
//!
//! Invariant: hole ranges always read as zeros (writes into a hole turn that part into data).

use std::io;
use std::ops::Range;

use futures::future::BoxFuture;
use parking_lot::RwLock;

use super::{errno_error, BlockDevice, Extent, ExtentKind, MappedPiece, Residency, WritableDevice};

struct State {
    data: Vec<u8>,
    /// Sorted, non-overlapping.
    holes: Vec<Range<u64>>,
}

/// A block device in memory. See the module docs.
pub struct MemDevice {
    state: RwLock<State>,
    /// Sorted, non-overlapping.
    remote: Vec<Range<u64>>,
    writable: bool,
    /// Whether `try_read_mapped` serves reads (see [`MemDevice::with_mapped`]).
    mapped: bool,
}

/// Data pieces of `try_read_mapped` are cut at multiples of this, so one read yields
/// several pieces of different lengths.
const MAPPED_PIECE: u64 = 40_000;

impl MemDevice {
    /// A read-only device with these bytes, all data, all local.
    pub fn new(data: Vec<u8>) -> MemDevice {
        MemDevice {
            state: RwLock::new(State {
                data,
                holes: Vec::new(),
            }),
            remote: Vec::new(),
            writable: false,
            mapped: false,
        }
    }

    /// Mark `holes` as holes (their bytes are zeroed). Ranges are clipped to the size.
    pub fn with_holes(self, holes: impl IntoIterator<Item = Range<u64>>) -> MemDevice {
        {
            let mut st = self.state.write();
            let size = st.data.len() as u64;
            let mut hs: Vec<Range<u64>> = holes
                .into_iter()
                .map(|r| r.start.min(size)..r.end.min(size))
                .filter(|r| !r.is_empty())
                .collect();
            for h in &hs {
                st.data[h.start as usize..h.end as usize].fill(0);
            }
            hs.append(&mut st.holes);
            st.holes = normalize(hs);
        }
        self
    }

    /// Mark `range` as a hole (its bytes are zeroed).
    pub fn with_hole(self, range: Range<u64>) -> MemDevice {
        self.with_holes(std::iter::once(range))
    }

    /// Mark `range` as remote: reported as such and never served by `try_read_nowait`.
    pub fn with_remote(mut self, range: Range<u64>) -> MemDevice {
        self.remote.push(range);
        self.remote = normalize(std::mem::take(&mut self.remote));
        self
    }

    /// Accept writes through [`BlockDevice::writable`].
    /// Serve local reads through [`BlockDevice::try_read_mapped`] too (holes as zero
    /// pieces, data as copies cut at multiples of 40 000 bytes), to exercise a front end's
    /// zero-copy path.
    pub fn with_mapped(mut self) -> MemDevice {
        self.mapped = true;
        self
    }

    /// Make the device writable.
    pub fn with_writes(mut self) -> MemDevice {
        self.writable = true;
        self
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.state.read().data.clone()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<Range<usize>> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(errno_error(libc::EINVAL)),
        }
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.state.read().data[r]);
        Ok(())
    }

    fn touches_remote(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.remote.iter().any(|r| r.start < end && offset < r.end)
    }
}

/// Sort and merge overlapping or adjacent ranges.
fn normalize(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.retain(|r| !r.is_empty());
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// `ranges` minus `cut`.
fn subtract(ranges: &[Range<u64>], cut: Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for r in ranges {
        if r.end <= cut.start || cut.end <= r.start {
            out.push(r.clone());
            continue;
        }
        if r.start < cut.start {
            out.push(r.start..cut.start);
        }
        if cut.end < r.end {
            out.push(cut.end..r.end);
        }
    }
    out
}

/// Whether `pos` is inside one of `ranges`, and where the current run (inside or outside)
/// ends, capped at `end`.
fn run_at(ranges: &[Range<u64>], pos: u64, end: u64) -> (bool, u64) {
    for r in ranges {
        if pos < r.start {
            return (false, r.start.min(end));
        }
        if pos < r.end {
            return (true, r.end.min(end));
        }
    }
    (false, end)
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.state.read().data.len() as u64
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if self.touches_remote(offset, buf.len() as u64) {
            return None;
        }
        Some(self.read_now(offset, buf))
    }

    fn try_read_mapped(
        &self,
        offset: u64,
        len: usize,
        out: &mut Vec<MappedPiece>,
    ) -> Option<io::Result<()>> {
        if !self.mapped || self.touches_remote(offset, len as u64) {
            return None;
        }
        if let Err(e) = self.check(offset, len as u64) {
            return Some(Err(e));
        }
        let st = self.state.read();
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let (hole, run_end) = run_at(&st.holes, pos, end);
            if hole {
                out.push(MappedPiece::Zero((run_end - pos) as usize));
                pos = run_end;
                continue;
            }
            let next = ((pos / MAPPED_PIECE + 1) * MAPPED_PIECE).min(run_end);
            let bytes = &st.data[pos as usize..next as usize];
            out.push(MappedPiece::Data(bytes::Bytes::copy_from_slice(bytes)));
            pos = next;
        }
        Some(Ok(()))
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            // Let the caller see this as a real suspension point.
            tokio::task::yield_now().await;
            self.read_now(offset, buf)
        })
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Vec<Extent> {
        let st = self.state.read();
        let end = offset.saturating_add(len).min(st.data.len() as u64);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_extents.max(1) {
            let (hole, hole_end) = run_at(&st.holes, pos, end);
            let (remote, remote_end) = run_at(&self.remote, pos, end);
            let next = hole_end.min(remote_end);
            let kind = if hole {
                ExtentKind::Hole
            } else {
                ExtentKind::Data
            };
            let residency = if remote && !hole {
                Residency::Remote
            } else {
                Residency::Local
            };
            match out.last_mut() {
                Some(last) if last.kind == kind && last.residency == residency => {
                    last.len = next - last.offset
                }
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    kind,
                    residency,
                }),
            }
            pos = next;
        }
        out
    }

    fn writable(&self) -> Option<&dyn WritableDevice> {
        if self.writable {
            Some(self)
        } else {
            None
        }
    }
}

impl MemDevice {
    fn write_now(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let r = self.check(offset, data.len() as u64)?;
        let mut st = self.state.write();
        st.data[r.clone()].copy_from_slice(data);
        st.holes = subtract(&st.holes, r.start as u64..r.end as u64);
        Ok(())
    }

    fn zero_now(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        let r = self.check(offset, len)?;
        let mut st = self.state.write();
        st.data[r.clone()].fill(0);
        let range = r.start as u64..r.end as u64;
        st.holes = if punch {
            let mut h = st.holes.clone();
            h.push(range);
            normalize(h)
        } else {
            subtract(&st.holes, range)
        };
        Ok(())
    }
}

impl WritableDevice for MemDevice {
    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        _fua: bool,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { self.write_now(offset, data) })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.zero_now(offset, len, true) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        _fua: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.zero_now(offset, len, may_punch) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_read_as_zeros_and_are_reported() {
        let dev = MemDevice::new(vec![7u8; 100]).with_hole(10..20);
        let mut buf = [1u8; 30];
        dev.try_read_nowait(0, &mut buf).unwrap().unwrap();
        assert_eq!(&buf[10..20], &[0u8; 10]);
        assert_eq!(buf[9], 7);
        let e = dev.extents(0, 100, 10);
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[1].offset, e[1].len, e[1].kind),
            (10, 10, ExtentKind::Hole)
        );
        assert_eq!(e[2].offset + e[2].len, 100);
    }

    #[test]
    fn remote_ranges_block_the_nowait_path() {
        let dev = MemDevice::new(vec![1u8; 100]).with_remote(50..60);
        let mut buf = [0u8; 10];
        assert!(dev.try_read_nowait(45, &mut buf).is_none());
        assert!(dev.try_read_nowait(60, &mut buf).is_some());
        let e = dev.extents(40, 30, 10);
        assert_eq!(e[1].residency, Residency::Remote);
        assert_eq!((e[1].offset, e[1].len), (50, 10));
    }

    #[test]
    fn extents_stop_at_max() {
        let dev = MemDevice::new(vec![1u8; 100]).with_holes([10..20, 30..40]);
        assert_eq!(dev.extents(0, 100, 2).len(), 2);
    }

    #[test]
    fn read_past_end_returns_einval() {
        let dev = MemDevice::new(vec![1u8; 10]);
        let mut buf = [0u8; 4];
        let err = dev.try_read_nowait(8, &mut buf).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[tokio::test]
    async fn write_into_hole_makes_data() {
        let dev = MemDevice::new(vec![0u8; 100])
            .with_hole(0..100)
            .with_writes();
        BlockDevice::writable(&dev)
            .unwrap()
            .write(10, &[5; 10], false)
            .await
            .unwrap();
        let e = dev.extents(0, 100, 10);
        assert_eq!(e[1].kind, ExtentKind::Data);
        assert_eq!((e[1].offset, e[1].len), (10, 10));
        assert_eq!(dev.contents()[15], 5);
    }
}
