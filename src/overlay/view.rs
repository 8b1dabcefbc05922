//! [`SnapshotView`]: one snapshot of an overlay, read in place, without copying a block.
//!
//! A view holds a clone of the snapshot's block map (chunks shared with the overlay's maps, so
//! it costs a pointer per 2 MiB) and reads the physical blocks it names from the overlay's
//! data file. The blocks keep their bytes while it lives because the view **pins** the
//! overlay (`Meta::pins`): no reference count is decremented, so no block is freed, punched,
//! reused, or overwritten in place (a write redirects from any block with a count above one,
//! and a block the view names keeps the snapshot's reference even after the snapshot is
//! deleted). The volume goes on meanwhile: writes, new snapshots, deleting this snapshot,
//! revert. The cost of a long-lived view is that freed blocks wait for it: the data file
//! only grows until it is dropped.
//!
//! Invariant: `Meta::pins` counts live views and running clones; the view's `Drop` is the
//! only place its pin is released.

use std::io;
use std::sync::Arc;

use super::map::BlockMap;
use super::{map_range, BaseRead, Mapping, Overlay, OverlayError, Result};

/// A read-only view of one snapshot (see the module docs). Made by
/// [`Overlay::snapshot_view`].
pub struct SnapshotView {
    overlay: Arc<Overlay>,
    name: String,
    map: BlockMap,
    size: u64,
    base_len: u64,
}

impl Overlay {
    /// A view of snapshot `name` as it is now, reading its blocks in place; the overlay's
    /// blocks are pinned until the view is dropped.
    pub fn snapshot_view(self: &Arc<Self>, name: &str) -> Result<SnapshotView> {
        let mut m = self.meta.lock();
        let snap = m
            .snapshots
            .get(name)
            .ok_or_else(|| OverlayError::SnapshotNotFound(name.to_string()))?;
        let (map, size) = (snap.map.clone(), snap.size);
        let base_len = m.base_len;
        m.pins += 1;
        Ok(SnapshotView {
            overlay: self.clone(),
            name: name.to_string(),
            map,
            size,
            base_len,
        })
    }
}

impl SnapshotView {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Virtual size of the volume when the snapshot was taken.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of the base image (unwritten blocks past it read as zeros).
    pub fn base_len(&self) -> u64 {
        self.base_len
    }

    /// Where the snapshot's bytes `offset .. offset+len` live, in order.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Mapping>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(map_range(&self.map, self.base_len, offset, len)),
            _ => Err(OverlayError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Read overlay bytes at `phys_off` (from a [`Mapping::Overlay`] of this view), blocking.
    pub fn read_overlay(&self, phys_off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.overlay.data.read_at(buf, phys_off)
    }

    /// As [`Self::read_overlay`] without blocking; `None` if it would block.
    pub fn read_overlay_nowait(&self, phys_off: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.overlay.data.read_nowait(buf, phys_off)
    }

    /// Read `buf.len()` bytes at `offset`, blocking; base pieces come from `base`.
    pub fn read(&self, offset: u64, buf: &mut [u8], base: &dyn BaseRead) -> Result<()> {
        for m in self.map(offset, buf.len() as u64)? {
            let s = (m.offset() - offset) as usize;
            let dst = &mut buf[s..s + m.len() as usize];
            match m {
                Mapping::Overlay { phys_off, .. } => {
                    self.read_overlay(phys_off, dst)
                        .map_err(|source| OverlayError::Io {
                            context: "reading overlay data",
                            source,
                        })?
                }
                Mapping::Zero { .. } => dst.fill(0),
                Mapping::Base { offset, .. } => {
                    base.read_base(offset, dst).map_err(OverlayError::Base)?
                }
            }
        }
        Ok(())
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        self.overlay.meta.lock().pins -= 1;
    }
}
