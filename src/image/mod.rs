//! Images: manifests, importing files into a store, the read-only image device.
//!
//! SIGNATURE STUBS: the store/image work replaces the bodies; the signatures are the
//! contract the daemon is written against. Keep them (extend, do not break).

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::device::{BlockDevice, Extent};
use crate::error::{Classify, ErrorKind};
use crate::store::Store;
use crate::types::{Digest, ImageId};

pub mod ledger;

pub use ledger::ChunkLedger;

/// Errors of image operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not implemented yet")]
    Unimplemented,
}

impl Classify for ImageError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

/// An expected checksum of an image's raw content (`--checksum md5:HEX|sha256:HEX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Md5([u8; 16]),
    Sha256([u8; 32]),
}

impl std::str::FromStr for Checksum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Err(format!("checksum parsing not implemented: {s}"))
    }
}

/// Progress callback: `(bytes_done, bytes_total)`.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Answers "does the catalog reference this chunk?" (committed images only).
pub type IsReferenced = Arc<dyn Fn(&Digest) -> bool + Send + Sync>;

/// Options of [`import_file`].
#[derive(Clone)]
pub struct ImportOptions {
    /// Chunk size in bytes, a power of two in 64 KiB ..= 16 MiB.
    pub chunk_size: u32,
    /// If set, the import fails (leaving nothing behind) when the content does not match.
    pub expected: Option<Checksum>,
    /// Called as bytes are read.
    pub progress: Option<Progress>,
    /// Set to true to cancel; the import then fails and cleans up.
    pub cancel: Arc<AtomicBool>,
}

/// What an import produced. Nothing of it is committed to the catalog yet.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Store key of the manifest written.
    pub manifest_key: String,
    pub virtual_size: u64,
    /// Bytes of the distinct non-hole chunks this image references.
    pub stored_size: u64,
    pub chunk_size: u32,
    /// Lower-case hex.
    pub md5: String,
    /// Lower-case hex.
    pub sha256: String,
    /// Distinct non-hole chunk digests the manifest references.
    pub digests: Vec<Digest>,
    pub chunks_total: u64,
    pub chunks_hole: u64,
    /// Chunks this import had to write (not already in the store).
    pub chunks_new: u64,
}

/// Import the raw file at `path` into `store` as image `id`.
///
/// Holds `ledger` references on every chunk it uses until the returned guard is dropped;
/// the caller drops it after committing the catalog row. On any failure (I/O, checksum
/// mismatch, cancel) it deletes the chunks and manifest it created that neither the
/// catalog (`is_referenced`) nor another in-flight import uses, and returns the error.
pub async fn import_file(
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
    id: ImageId,
    path: &Path,
    opts: ImportOptions,
) -> Result<(Imported, ledger::LedgerGuard), ImageError> {
    let _ = (store, ledger, is_referenced, id, path, opts);
    Err(ImageError::Unimplemented)
}

/// Delete `digests` (chunks of an expunged image) and `manifest_key` from `store`, except
/// chunks the catalog still references or an in-flight import holds. Returns how many
/// chunks were deleted.
pub async fn delete_unreferenced(
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    is_referenced: IsReferenced,
    manifest_key: &str,
    digests: &[Digest],
) -> Result<u64, ImageError> {
    let _ = (store, ledger, is_referenced, manifest_key, digests);
    Err(ImageError::Unimplemented)
}

/// Start-up sweep: delete every chunk and manifest in `store` that is not in the given
/// sets (left behind by a crash mid-import or mid-expunge). Returns (chunks, manifests)
/// deleted.
pub async fn sweep_orphans(
    store: Arc<dyn Store>,
    referenced_chunks: &HashSet<Digest>,
    referenced_manifests: &HashSet<String>,
) -> Result<(u64, u64), ImageError> {
    let _ = (store, referenced_chunks, referenced_manifests);
    Err(ImageError::Unimplemented)
}

/// A read-only image: a manifest over chunks in a store.
pub struct Image {
    _private: (),
}

impl Image {
    /// Load the manifest `manifest_key` from `store` and open the image for reading.
    pub async fn open(store: Arc<dyn Store>, manifest_key: &str) -> Result<Arc<Image>, ImageError> {
        let _ = (store, manifest_key);
        Err(ImageError::Unimplemented)
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        0
    }
    fn try_read_nowait(&self, _offset: u64, _buf: &mut [u8]) -> Option<io::Result<()>> {
        None
    }
    fn read<'a>(&'a self, _offset: u64, _buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async { Err(crate::device::errno_error(libc::EIO)) })
    }
    fn extents(&self, _offset: u64, _len: u64, _max: usize) -> Vec<Extent> {
        Vec::new()
    }
}
