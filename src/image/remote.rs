//! Chunk sources for images whose chunks are not local: the link between an image and the
//! chunk cache.
//!
//! - [`ManifestSource`]: native chunked images (manifest + content-addressed chunks) in any
//!   store. Every fetched chunk is verified against its blake3 digest before the cache sees
//!   it; a chunk with the wrong bytes or length is an error (`Corrupt`), never served.
//! - [`ObjectSource`]: a plain raw image object (`--url`), read by byte range, chunk `i`
//!   being bytes `i*chunk_size ..` of the object. There is no digest to check; the length is.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{chunk_key, Manifest};
use crate::cache::{ChunkSource, SourceError};
use crate::error::{Classify, ErrorKind};
use crate::store::{Store, StoreError};
use crate::types::Digest;

fn store_failure(e: StoreError) -> SourceError {
    SourceError {
        kind: e.kind(),
        message: "store request failed".into(),
        source: Some(Box::new(e)),
    }
}

/// Chunks of a native image, fetched by digest and verified.
pub struct ManifestSource {
    store: Arc<dyn Store>,
    manifest: Arc<Manifest>,
}

impl ManifestSource {
    pub fn new(store: Arc<dyn Store>, manifest: Arc<Manifest>) -> ManifestSource {
        ManifestSource { store, manifest }
    }
}

impl ChunkSource for ManifestSource {
    fn fetch(&self, index: u64, len: usize) -> BoxFuture<'static, Result<Bytes, SourceError>> {
        let store = self.store.clone();
        let digest = self.manifest.chunk(index).copied();
        Box::pin(async move {
            let Some(digest) = digest else {
                return Ok(Bytes::from(vec![0u8; len]));
            };
            let key = chunk_key(&digest);
            let bytes = store.get(&key).await.map_err(store_failure)?;
            if bytes.len() != len {
                return Err(SourceError {
                    kind: ErrorKind::Corrupt,
                    message: format!("chunk {key} has {} bytes, expected {len}", bytes.len()),
                    source: None,
                });
            }
            if Digest::of(&bytes) != digest {
                return Err(SourceError {
                    kind: ErrorKind::Corrupt,
                    message: format!("chunk {key} does not match its digest"),
                    source: None,
                });
            }
            Ok(bytes)
        })
    }

    fn has_data(&self, index: u64) -> bool {
        !self.manifest.is_hole(index)
    }
}

/// Chunks of a raw image object, fetched by byte range.
pub struct ObjectSource {
    store: Arc<dyn Store>,
    key: String,
    chunk_size: u64,
}

impl ObjectSource {
    pub fn new(store: Arc<dyn Store>, key: String, chunk_size: u32) -> ObjectSource {
        ObjectSource {
            store,
            key,
            chunk_size: chunk_size as u64,
        }
    }
}

impl ChunkSource for ObjectSource {
    fn fetch(&self, index: u64, len: usize) -> BoxFuture<'static, Result<Bytes, SourceError>> {
        let store = self.store.clone();
        let key = self.key.clone();
        let start = index * self.chunk_size;
        Box::pin(async move {
            let bytes = store
                .get_range(&key, start..start + len as u64)
                .await
                .map_err(store_failure)?;
            if bytes.len() != len {
                return Err(SourceError {
                    kind: ErrorKind::Corrupt,
                    message: format!(
                        "range {start}+{len} of {key} came back with {} bytes",
                        bytes.len()
                    ),
                    source: None,
                });
            }
            Ok(bytes)
        })
    }

    fn has_data(&self, _index: u64) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::cache::{CacheConfig, ChunkCache};
    use crate::device::{BlockDevice, ExtentKind, Residency};
    use crate::image::testutil::tempdir;
    use crate::image::{import_file, ChunkLedger, Image, ImportOptions};
    use crate::store::fault::{Fault, FaultStore, Op, Rule, When};
    use crate::store::mem::MemStore;
    use crate::types::ImageId;

    const CS: u32 = 64 * 1024;

    /// A native image of `data` in a fault-injectable in-memory store.
    async fn native(data: &[u8]) -> (Arc<FaultStore<MemStore>>, String, tempfile::TempDir) {
        let dir = tempdir();
        let path = dir.path().join("src.raw");
        std::fs::write(&path, data).unwrap();
        let mem = Arc::new(MemStore::new());
        let (imp, _guard) = import_file(
            mem.clone(),
            Arc::new(ChunkLedger::default()),
            Arc::new(|_: &Digest| false),
            ImageId::random(),
            &path,
            ImportOptions {
                chunk_size: CS,
                expected: None,
                progress: None,
                cancel: Arc::new(AtomicBool::new(false)),
                known_present: None,
            },
        )
        .await
        .unwrap();
        (Arc::new(FaultStore::new(mem, 7)), imp.manifest_key, dir)
    }

    fn content(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        // Chunk 2 is a hole.
        v[2 * CS as usize..3 * CS as usize].fill(0);
        v
    }

    async fn read_all(img: &Image) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0u8; img.size() as usize];
        img.read(0, &mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn cached_native_image_reads_equal_source_and_holes_are_never_fetched() {
        let data = content(5 * CS as usize + 1000);
        let (store, key, dir) = native(&data).await;
        let cache = ChunkCache::open(CacheConfig::new(dir.path().join("cache"), 1 << 30)).unwrap();
        let img = Image::open_cached(store.clone(), &key, &cache, "img")
            .await
            .unwrap();
        let before = store.calls();
        let ext = img.extents(0, img.size(), 64);
        assert!(ext
            .iter()
            .any(|e| e.kind == ExtentKind::Data && e.residency == Residency::Remote));
        assert_eq!(read_all(&img).await.unwrap(), data);
        assert_eq!(
            store.calls() - before,
            5,
            "five data chunks fetched, the hole never"
        );
        let ext = img.extents(0, img.size(), 64);
        assert!(
            ext.iter().all(|e| e.residency == Residency::Local),
            "{ext:?}"
        );
        // Served from the cache now: the hot path answers.
        let mut b = vec![0u8; 4096];
        assert!(img
            .try_read_nowait(CS as u64, &mut b)
            .is_some_and(|r| r.is_ok()));
        assert_eq!(b, data[CS as usize..CS as usize + 4096]);
        assert_eq!(read_all(&img).await.unwrap(), data);
        assert_eq!(store.calls() - before, 5);
    }

    #[tokio::test]
    async fn a_chunk_with_wrong_bytes_from_the_store_is_never_served() {
        let data = content(3 * CS as usize);
        let (store, key, dir) = native(&data).await;
        let cache = ChunkCache::open(CacheConfig::new(dir.path().join("cache"), 1 << 30)).unwrap();
        let img = Image::open_cached(store.clone(), &key, &cache, "img")
            .await
            .unwrap();
        store.add_rule(Rule::new(Fault::FlipBit, When::FirstN(1), Some(Op::Get)));
        let mut b = vec![0u8; 4096];
        let err = img.read(0, &mut b).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(
            !img.cached().unwrap().is_cached(0),
            "a bad chunk must not be cached"
        );
        // The next read fetches again and gets good bytes.
        img.read(0, &mut b).await.unwrap();
        assert_eq!(b, data[..4096]);
    }

    #[tokio::test]
    async fn raw_object_is_read_by_range_through_the_cache() {
        let data = content(3 * CS as usize + 17);
        let mem = Arc::new(MemStore::new());
        mem.put("images/disk.raw", Bytes::from(data.clone()))
            .await
            .unwrap();
        let dir = tempdir();
        let cache = ChunkCache::open(CacheConfig::new(dir.path().join("cache"), 1 << 30)).unwrap();
        let img = Image::open_object(mem, "images/disk.raw", data.len() as u64, CS, &cache, "raw")
            .unwrap();
        let mut b = vec![0u8; 10_000];
        img.read(CS as u64 - 5000, &mut b).await.unwrap();
        assert_eq!(b, data[CS as usize - 5000..CS as usize + 5000]);
        assert_eq!(read_all(&img).await.unwrap(), data);
    }
}
