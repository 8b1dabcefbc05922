//! Images: manifests, importing files into a store, the read-only image device.
//!
//! - [`manifest`]: the binary manifest format ([`Manifest::encode`] / [`Manifest::decode`]).
//! - [`import`]: [`import_file`], raw file → chunks + manifest in a store, with dedup.
//! - [`ledger`]: [`ChunkLedger`], in-flight chunk references that make dedup race-free.
//! - [`gc`]: [`delete_unreferenced`] (expunge) and [`sweep_orphans`] (start-up).
//! - [`read`]: [`Image`], the read-only [`crate::device::BlockDevice`] over a manifest.
//!
//! Object layout in a store (byte layouts in `docs/store-format.md`):
//! chunks at `chunks/<first 2 hex>/<64 hex of blake3>` ([`chunk_key`]), manifests at
//! `manifests/<image uuid>` ([`manifest_key`]). Chunks are immutable and content-addressed;
//! all-zero chunks are never stored (they are holes in the manifest).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Classify, ErrorKind};
use crate::store::StoreError;
use crate::types::{Digest, ImageId};

pub mod gc;
pub mod import;
pub mod ledger;
pub mod manifest;
pub mod read;
pub mod remote;

pub use crate::sys::raise_fd_limit;
pub use gc::{delete_unreferenced, sweep_orphans};
pub use import::{import_device, import_file};
pub use ledger::{ChunkLedger, LedgerGuard};
pub use manifest::{Manifest, ManifestError};
pub use read::{FdCache, Image};

/// Errors of image operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid chunk size {chunk_size}: use a power of two between 64K and 16M (e.g. 1M)")]
    InvalidChunkSize { chunk_size: u32 },
    #[error("cannot import {path:?}: it is {what}, not a regular file or block device")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("cannot import {path:?}: it is empty (an image needs at least one byte)")]
    EmptyFile { path: PathBuf },
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {what}")]
    DeviceRead {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} changed size during import (expected {expected} bytes, read {actual})")]
    FileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("import cancelled")]
    Cancelled,
    #[error("store operation failed")]
    Store(#[from] StoreError),
    #[error("invalid manifest {key:?}")]
    Manifest {
        key: String,
        #[source]
        source: ManifestError,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classify for ImageError {
    fn kind(&self) -> ErrorKind {
        match self {
            ImageError::InvalidChunkSize { .. }
            | ImageError::NotAFile { .. }
            | ImageError::EmptyFile { .. }
            | ImageError::ChecksumMismatch { .. } => ErrorKind::InvalidInput,
            ImageError::Read { source, .. } | ImageError::DeviceRead { source, .. } => {
                ErrorKind::of_io(source)
            }
            ImageError::FileChanged { .. } | ImageError::Cancelled => ErrorKind::Conflict,
            ImageError::Store(e) => e.kind(),
            ImageError::Manifest { .. } => ErrorKind::Corrupt,
            ImageError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// An expected checksum of an image's raw content (`--checksum md5:HEX|sha256:HEX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Md5([u8; 16]),
    Sha256([u8; 32]),
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checksum::Md5(b) => write!(f, "md5:{}", hex::encode(b)),
            Checksum::Sha256(b) => write!(f, "sha256:{}", hex::encode(b)),
        }
    }
}

impl std::str::FromStr for Checksum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected md5:<32 hex digits> or sha256:<64 hex digits>";
        let Some((algo, hex_part)) = s.trim().split_once(':') else {
            return Err(format!("invalid checksum {s:?}: {usage}"));
        };
        fn parse<const N: usize>(s: &str, hex_part: &str, algo: &str) -> Result<[u8; N], String> {
            if hex_part.len() != 2 * N {
                return Err(format!(
                    "invalid {algo} checksum {s:?}: expected {} hex digits, got {}",
                    2 * N,
                    hex_part.len()
                ));
            }
            let mut out = [0u8; N];
            hex::decode_to_slice(hex_part, &mut out)
                .map_err(|_| format!("invalid {algo} checksum {s:?}: not hexadecimal"))?;
            Ok(out)
        }
        match algo.to_ascii_lowercase().as_str() {
            "md5" => parse::<16>(s, hex_part, "md5").map(Checksum::Md5),
            "sha256" => parse::<32>(s, hex_part, "sha256").map(Checksum::Sha256),
            other => Err(format!(
                "invalid checksum {s:?}: unknown algorithm {other:?}; {usage}"
            )),
        }
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
    /// Chunks the target store is known to hold (a base image's, in the base's remote
    /// store): counted as shared without a `head` request. Only for stores whose chunks no
    /// one deletes behind the import's back; the local store always asks.
    pub known_present: Option<Arc<HashSet<Digest>>>,
}

impl ImportOptions {
    /// Options with `chunk_size` and nothing else set.
    pub fn new(chunk_size: u32) -> ImportOptions {
        ImportOptions {
            chunk_size,
            expected: None,
            progress: None,
            cancel: Arc::new(AtomicBool::new(false)),
            known_present: None,
        }
    }
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

/// The store key of the chunk with digest `d`: `chunks/<first 2 hex>/<64 hex>`.
pub fn chunk_key(d: &Digest) -> String {
    let h = d.to_hex();
    format!("chunks/{}/{}", &h[..2], h)
}

/// The digest a well-formed chunk key names, or `None`.
pub fn parse_chunk_key(key: &str) -> Option<Digest> {
    let rest = key.strip_prefix("chunks/")?;
    let (dir, name) = rest.split_once('/')?;
    if name.len() != 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let d = Digest::from_hex(name)?;
    (dir == &name[..2]).then_some(d)
}

/// The store key of image `id`'s manifest: `manifests/<uuid>`.
pub fn manifest_key(id: ImageId) -> String {
    format!("manifests/{id}")
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;

    /// A temp dir on tmpfs when available (fast), else the system temp dir.
    pub fn tempdir() -> tempfile::TempDir {
        let shm = std::path::Path::new("/dev/shm");
        let base: PathBuf = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        tempfile::Builder::new()
            .prefix("imgcache-test-")
            .tempdir_in(base)
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_parses_md5_and_sha256() {
        let m: Checksum = "md5:d41d8cd98f00b204e9800998ecf8427e".parse().unwrap();
        assert_eq!(m.to_string(), "md5:d41d8cd98f00b204e9800998ecf8427e");
        let s: Checksum = format!("SHA256:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(s, Checksum::Sha256([0xab; 32]));
    }

    #[test]
    fn checksum_rejects_bad_input_with_clear_errors() {
        let e = "md5:abc".parse::<Checksum>().unwrap_err();
        assert!(e.contains("32 hex digits"), "{e}");
        let e = format!("sha256:{}", "zz".repeat(32))
            .parse::<Checksum>()
            .unwrap_err();
        assert!(e.contains("not hexadecimal"), "{e}");
        let e = "crc32:0000".parse::<Checksum>().unwrap_err();
        assert!(e.contains("unknown algorithm"), "{e}");
        let e = "d41d8cd98f00b204e9800998ecf8427e"
            .parse::<Checksum>()
            .unwrap_err();
        assert!(e.contains("md5:"), "{e}");
    }

    #[test]
    fn chunk_key_round_trips() {
        let d = Digest::of(b"x");
        let k = chunk_key(&d);
        assert_eq!(k.len(), "chunks/".len() + 3 + 64);
        crate::store::validate_key(&k).unwrap();
        assert_eq!(parse_chunk_key(&k), Some(d));
        assert_eq!(parse_chunk_key("chunks/00/abc"), None);
        let wrong_dir = format!("chunks/zz/{}", d.to_hex());
        assert_eq!(parse_chunk_key(&wrong_dir), None);
    }
}

#[cfg(test)]
mod tests_import;
