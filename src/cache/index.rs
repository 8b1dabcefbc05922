//! The cache's persistent index (redb): which chunks of which image are cached, with the
//! CRC32 of each 4 KiB block of each cached chunk, and which images are pinned.
//!
//! A row is committed (durably) only after the chunk's bytes are durable in the image's data
//! file, so after a crash or power loss every indexed chunk has its bytes on disk; bytes that
//! rotted since are caught by the block CRCs on read. Layout: `docs/cache-format.md`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::CacheError;

/// (image key, chunk index) → chunk length (u32 LE) followed by one CRC32 (u32 LE) per block.
const CHUNKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chunks");
/// image key → 1 for pinned images.
const PINS: TableDefinition<&str, u8> = TableDefinition::new("pins");
/// "schema_version" → version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const SCHEMA_VERSION: u64 = 1;

/// One cached chunk as the index records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedChunk {
    pub index: u64,
    pub len: u32,
    pub crcs: Box<[u32]>,
}

fn storage(e: impl Into<redb::Error>) -> CacheError {
    CacheError::Index(e.into())
}

/// The persistent index of a cache directory.
pub struct CacheIndex {
    db: Database,
}

impl CacheIndex {
    /// Open or create the index at `path`.
    pub fn open(path: &Path) -> Result<CacheIndex, CacheError> {
        let db = Database::create(path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let found = meta
                .get("schema_version")
                .map_err(storage)?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(storage)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(CacheError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
            }
            txn.open_table(CHUNKS).map_err(storage)?;
            txn.open_table(PINS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(CacheIndex { db })
    }

    /// Every indexed chunk, grouped by image key.
    pub fn load(&self) -> Result<HashMap<String, Vec<IndexedChunk>>, CacheError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(CHUNKS).map_err(storage)?;
        let mut out: HashMap<String, Vec<IndexedChunk>> = HashMap::new();
        for row in table.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let (image, index) = k.value();
            match decode_value(v.value()) {
                Some((len, crcs)) => out
                    .entry(image.to_string())
                    .or_default()
                    .push(IndexedChunk { index, len, crcs }),
                None => tracing::warn!(image, index, "ignoring a malformed cache index row"),
            }
        }
        Ok(out)
    }

    /// Record chunk `index` of `image` as cached (durable on return).
    pub fn insert(
        &self,
        image: &str,
        index: u64,
        len: u32,
        crcs: &[u32],
    ) -> Result<(), CacheError> {
        let mut value = Vec::with_capacity(4 + 4 * crcs.len());
        value.extend_from_slice(&len.to_le_bytes());
        for c in crcs {
            value.extend_from_slice(&c.to_le_bytes());
        }
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(CHUNKS).map_err(storage)?;
            t.insert((image, index), value.as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// Forget the given chunks (durable on return).
    pub fn remove(&self, chunks: &[(&str, u64)]) -> Result<(), CacheError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(CHUNKS).map_err(storage)?;
            for &(image, index) in chunks {
                t.remove((image, index)).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    /// Forget every chunk of `image` and its pin.
    pub fn remove_image(&self, image: &str) -> Result<(), CacheError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(CHUNKS).map_err(storage)?;
            t.retain_in((image, 0u64)..=(image, u64::MAX), |_, _| false)
                .map_err(storage)?;
            let mut p = txn.open_table(PINS).map_err(storage)?;
            p.remove(image).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// Pin or unpin `image` (durable on return).
    pub fn set_pinned(&self, image: &str, pinned: bool) -> Result<(), CacheError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut p = txn.open_table(PINS).map_err(storage)?;
            if pinned {
                p.insert(image, 1u8).map_err(storage)?;
            } else {
                p.remove(image).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    /// The pinned image keys.
    pub fn pinned(&self) -> Result<HashSet<String>, CacheError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let p = txn.open_table(PINS).map_err(storage)?;
        let mut out = HashSet::new();
        for row in p.iter().map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            out.insert(k.value().to_string());
        }
        Ok(out)
    }
}

fn decode_value(v: &[u8]) -> Option<(u32, Box<[u32]>)> {
    if v.len() < 4 || v.len() % 4 != 0 {
        return None;
    }
    let len = u32::from_le_bytes(v[..4].try_into().ok()?);
    let crcs: Box<[u32]> = v[4..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if crcs.len() != (len as usize).div_ceil(super::BLOCK) {
        return None;
    }
    Some((len, crcs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_reopen_and_remove_image_forgets_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let idx = CacheIndex::open(&path).unwrap();
            idx.insert("a", 3, 8192, &[1, 2]).unwrap();
            idx.insert("a", 4, 100, &[9]).unwrap();
            idx.insert("b", 0, 4096, &[5]).unwrap();
            idx.set_pinned("b", true).unwrap();
        }
        let idx = CacheIndex::open(&path).unwrap();
        let all = idx.load().unwrap();
        assert_eq!(all["a"].len(), 2);
        assert_eq!(all["a"][0].crcs.as_ref(), &[1, 2]);
        assert!(idx.pinned().unwrap().contains("b"));
        idx.remove_image("a").unwrap();
        idx.remove(&[("b", 0)]).unwrap();
        assert!(idx.load().unwrap().is_empty());
        assert!(
            idx.pinned().unwrap().contains("b"),
            "pins are kept until the image goes"
        );
    }
}
