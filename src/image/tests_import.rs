//! Import → store → read tests for the image module (DirStore on tmpfs).

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::prelude::*;

use super::testutil::tempdir;
use super::*;
use crate::device::{errno_of, BlockDevice, ExtentKind, MappedPiece};
use crate::store::dir::DirStore;
use crate::store::{Store, StoreError};

const CS: u32 = 64 * 1024;
const CSU: usize = CS as usize;

struct Env {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    ledger: Arc<ChunkLedger>,
    /// Digests of "committed" images, as the catalog would answer.
    committed: Arc<parking_lot::Mutex<HashSet<Digest>>>,
}

impl Env {
    fn new() -> Env {
        let dir = tempdir();
        let store: Arc<dyn Store> = Arc::new(DirStore::open(dir.path().join("store")).unwrap());
        Env {
            dir,
            store,
            ledger: Arc::new(ChunkLedger::new()),
            committed: Default::default(),
        }
    }

    fn is_referenced(&self) -> IsReferenced {
        let c = Arc::clone(&self.committed);
        Arc::new(move |d| c.lock().contains(d))
    }

    fn write_file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    async fn import(&self, path: &Path, opts: ImportOptions) -> Result<Imported, ImageError> {
        let (imported, guard) = import_file(
            Arc::clone(&self.store),
            Arc::clone(&self.ledger),
            self.is_referenced(),
            ImageId::random(),
            path,
            opts,
        )
        .await?;
        // Commit to the "catalog", then release the ledger.
        self.committed
            .lock()
            .extend(imported.digests.iter().copied());
        drop(guard);
        Ok(imported)
    }

    async fn import_bytes(&self, data: &[u8]) -> Imported {
        let p = self.write_file("src.img", data);
        self.import(&p, ImportOptions::new(CS)).await.unwrap()
    }

    async fn chunk_keys(&self) -> Vec<String> {
        self.store.list("chunks/").await.unwrap()
    }

    async fn manifest_keys(&self) -> Vec<String> {
        self.store.list("manifests/").await.unwrap()
    }
}

/// Data with random, zero, and repeated chunk-sized regions.
fn patterned(chunks: &[u8], tail: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for &c in chunks {
        let mut chunk = vec![c; CSU];
        if c != 0 {
            chunk[c as usize] = c.wrapping_mul(7);
        }
        v.extend_from_slice(&chunk);
    }
    v.extend(std::iter::repeat_n(0xAB, tail));
    v
}

async fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0xEEu8; img.size() as usize];
    img.read(0, &mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn import_then_read_returns_source_bytes() {
    let env = Env::new();
    let data = patterned(&[1, 0, 2, 0, 0, 3], 1000);
    let imp = env.import_bytes(&data).await;
    assert_eq!(imp.virtual_size, data.len() as u64);
    assert_eq!(imp.chunks_total, 7);
    assert_eq!(imp.chunks_hole, 3);
    assert_eq!(imp.chunks_new, 4);
    assert_eq!(imp.digests.len(), 4);
    assert_eq!(imp.stored_size, 3 * CS as u64 + 1000);
    assert_eq!(
        imp.md5,
        hex::encode(<md5::Md5 as md5::Digest>::digest(&data))
    );
    assert_eq!(
        imp.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
    );
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    assert_eq!(read_all(&img).await, data);
    assert_eq!(env.chunk_keys().await.len(), 4);
}

#[tokio::test]
async fn try_read_nowait_serves_cached_chunks_and_holes() {
    let env = Env::new();
    let data = patterned(&[5, 0, 6], 10);
    let imp = env.import_bytes(&data).await;
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    let mut buf = vec![0xEEu8; 100];
    // A hole never needs a file.
    assert!(img
        .try_read_nowait(CS as u64 + 5, &mut buf)
        .unwrap()
        .is_ok());
    assert_eq!(buf, vec![0u8; 100]);
    // Cold fd cache: the chunk file is opened inline (its dentry is cached after import).
    assert!(img.has_nowait_path());
    let span = 3 * CSU + 10 - 100;
    img.try_read_nowait(span as u64, &mut buf).unwrap().unwrap();
    assert_eq!(buf, &data[span..]);
    let mut cross = vec![0u8; CSU + 200];
    img.try_read_nowait(CS as u64 - 100, &mut cross)
        .unwrap()
        .unwrap();
    assert_eq!(cross, &data[CSU - 100..2 * CSU + 100]);
}

#[tokio::test]
async fn try_read_mapped_on_tmpfs_shares_chunk_bytes_and_reports_holes() {
    let env = Env::new();
    let data = patterned(&[5, 0, 6], 10);
    let imp = env.import_bytes(&data).await;
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    let mut pieces = Vec::new();
    let Some(res) = img.try_read_mapped(CS as u64 - 100, 2 * CSU, &mut pieces) else {
        // Only memory file systems are mapped; elsewhere the copying path serves reads.
        assert!(!crate::sys::is_memory_fs(env.dir.path()));
        return;
    };
    res.unwrap();
    let mut got = Vec::new();
    let mut zeros = 0;
    for p in &pieces {
        match p {
            MappedPiece::Data(b) => got.extend_from_slice(b),
            MappedPiece::Zero(n) => {
                zeros += n;
                got.resize(got.len() + n, 0);
            }
        }
    }
    assert_eq!(zeros, CSU);
    assert_eq!(pieces.len(), 3);
    assert_eq!(got, &data[CSU - 100..3 * CSU - 100]);
    // Past the end: EINVAL, as the copying path.
    pieces.clear();
    let end = data.len() as u64;
    assert!(img
        .try_read_mapped(end - 5, 10, &mut pieces)
        .unwrap()
        .is_err());
    // A mapping stays valid after its chunk file is removed (expunge).
    pieces.clear();
    img.try_read_mapped(0, 100, &mut pieces).unwrap().unwrap();
    for k in env.chunk_keys().await {
        env.store.delete(&k).await.unwrap();
    }
    let MappedPiece::Data(b) = &pieces[0] else {
        panic!("expected data");
    };
    assert_eq!(&b[..], &data[..100]);
}

#[tokio::test]
async fn read_past_end_returns_einval() {
    let env = Env::new();
    let imp = env.import_bytes(&patterned(&[1], 0)).await;
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    let mut buf = vec![0u8; 10];
    let e = img.read(CS as u64 - 5, &mut buf).await.unwrap_err();
    assert_eq!(errno_of(&e), libc::EINVAL);
    let e = img
        .try_read_nowait(u64::MAX - 2, &mut buf)
        .unwrap()
        .unwrap_err();
    assert_eq!(errno_of(&e), libc::EINVAL);
}

#[tokio::test]
async fn extents_report_holes_exactly_and_merge() {
    let env = Env::new();
    let data = patterned(&[1, 2, 0, 0, 3, 0], 7);
    let imp = env.import_bytes(&data).await;
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    let c = CS as u64;
    let ext: Vec<_> = img
        .extents(0, img.size(), 100)
        .iter()
        .map(|e| (e.offset, e.len, e.kind))
        .collect();
    assert_eq!(
        ext,
        vec![
            (0, 2 * c, ExtentKind::Data),
            (2 * c, 2 * c, ExtentKind::Hole),
            (4 * c, c, ExtentKind::Data),
            (5 * c, c, ExtentKind::Hole),
            (6 * c, 7, ExtentKind::Data),
        ]
    );
    // Clipped to the request, and limited by max_extents.
    let ext = img.extents(c + 10, 2 * c, 100);
    assert_eq!((ext[0].offset, ext[0].len), (c + 10, c - 10));
    assert_eq!((ext[1].offset, ext[1].len), (2 * c, c + 10));
    let ext = img.extents(0, img.size(), 2);
    assert_eq!(ext.len(), 2);
    assert_eq!(ext[1].offset + ext[1].len, 4 * c);
    assert!(img.extents(img.size(), 10, 5).is_empty());
    assert!(img.extents(0, 10, 0).is_empty());
}

#[tokio::test]
async fn identical_chunks_are_stored_once_across_images() {
    let env = Env::new();
    let a = env.import_bytes(&patterned(&[1, 2, 3, 1], 0)).await;
    assert_eq!(a.chunks_new, 3);
    let b = env.import_bytes(&patterned(&[3, 2, 4], 5)).await;
    assert_eq!(b.chunks_new, 2, "only chunk 4 and the tail are new");
    assert_eq!(env.chunk_keys().await.len(), 5);
    assert_eq!(env.manifest_keys().await.len(), 2);
}

#[tokio::test]
async fn checksum_mismatch_leaves_nothing_new_and_keeps_shared_chunks() {
    let env = Env::new();
    let first = env.import_bytes(&patterned(&[1, 2], 0)).await;
    let before = env.chunk_keys().await;
    let p = env.write_file("second.img", &patterned(&[2, 9, 8], 3));
    let mut opts = ImportOptions::new(CS);
    opts.expected = Some(format!("sha256:{}", "00".repeat(32)).parse().unwrap());
    let err = env.import(&p, opts).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ImageError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains(&format!("sha256:{}", "00".repeat(32))),
        "{msg}"
    );
    assert!(msg.contains("got sha256:"), "{msg}");
    assert_eq!(env.chunk_keys().await, before);
    assert_eq!(env.manifest_keys().await, vec![first.manifest_key.clone()]);
    assert_eq!(env.ledger.holders(&first.digests[0]), 0);
}

#[tokio::test]
async fn matching_checksum_is_accepted() {
    let env = Env::new();
    let data = patterned(&[1], 3);
    let p = env.write_file("x.img", &data);
    let mut opts = ImportOptions::new(CS);
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&data));
    opts.expected = Some(format!("md5:{md5}").parse().unwrap());
    env.import(&p, opts).await.unwrap();
}

#[tokio::test]
async fn cancel_mid_import_cleans_up() {
    let env = Env::new();
    let shared = env.import_bytes(&patterned(&[1], 0)).await;
    let p = env.write_file("big.img", &patterned(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0));
    let mut opts = ImportOptions::new(CS);
    let cancel = Arc::clone(&opts.cancel);
    opts.progress = Some(Arc::new(move |done, _total| {
        if done >= 3 * CS as u64 {
            cancel.store(true, Ordering::Relaxed);
        }
    }));
    let err = env.import(&p, opts).await.unwrap_err();
    assert!(matches!(err, ImageError::Cancelled), "{err:?}");
    assert_eq!(env.chunk_keys().await, vec![chunk_key(&shared.digests[0])]);
    assert_eq!(env.manifest_keys().await, vec![shared.manifest_key]);
}

#[tokio::test]
async fn cancel_before_start_fails_without_writing() {
    let env = Env::new();
    let p = env.write_file("x.img", &patterned(&[1, 2], 0));
    let opts = ImportOptions::new(CS);
    opts.cancel.store(true, Ordering::Relaxed);
    assert!(matches!(
        env.import(&p, opts).await,
        Err(ImageError::Cancelled)
    ));
    assert!(env.chunk_keys().await.is_empty());
    assert!(env.manifest_keys().await.is_empty());
}

#[tokio::test]
async fn failed_import_keeps_chunks_held_by_another_in_flight_import() {
    let env = Env::new();
    let data = patterned(&[4, 5], 0);
    // An in-flight (uncommitted) import holding the chunks.
    let p1 = env.write_file("a.img", &data);
    let (first, guard) = import_file(
        Arc::clone(&env.store),
        Arc::clone(&env.ledger),
        env.is_referenced(),
        ImageId::random(),
        &p1,
        ImportOptions::new(CS),
    )
    .await
    .unwrap();
    // A second import of the same content fails; its chunks are the first one's.
    let p2 = env.write_file("b.img", &data);
    let mut opts = ImportOptions::new(CS);
    opts.expected = Some(format!("md5:{}", "11".repeat(16)).parse().unwrap());
    assert!(env.import(&p2, opts).await.is_err());
    assert_eq!(env.chunk_keys().await.len(), 2);
    let img = Image::open(Arc::clone(&env.store), &first.manifest_key)
        .await
        .unwrap();
    assert_eq!(read_all(&img).await, data);
    drop(guard);
}

#[tokio::test]
async fn failed_import_deletes_chunks_it_created_even_if_repeated() {
    let env = Env::new();
    // Same chunk twice in one file, bad checksum: both references are cleaned up.
    let p = env.write_file("x.img", &patterned(&[7, 7, 0], 1));
    let mut opts = ImportOptions::new(CS);
    opts.expected = Some(format!("md5:{}", "11".repeat(16)).parse().unwrap());
    assert!(env.import(&p, opts).await.is_err());
    assert!(env.chunk_keys().await.is_empty());
}

#[tokio::test]
async fn delete_unreferenced_keeps_chunks_other_images_use() {
    let env = Env::new();
    let a = env.import_bytes(&patterned(&[1, 2, 3], 0)).await;
    let b = env.import_bytes(&patterned(&[3, 4], 0)).await;
    // Expunge a: the catalog now references only b's chunks.
    *env.committed.lock() = b.digests.iter().copied().collect();
    let n = delete_unreferenced(
        Arc::clone(&env.store),
        Arc::clone(&env.ledger),
        env.is_referenced(),
        &a.manifest_key,
        &a.digests,
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(env.manifest_keys().await, vec![b.manifest_key.clone()]);
    let img = Image::open(Arc::clone(&env.store), &b.manifest_key)
        .await
        .unwrap();
    assert_eq!(read_all(&img).await, patterned(&[3, 4], 0));
}

#[tokio::test]
async fn delete_unreferenced_keeps_chunks_held_in_ledger() {
    let env = Env::new();
    let a = env.import_bytes(&patterned(&[1, 2], 0)).await;
    let mut guard = env.ledger.guard();
    guard.hold(a.digests[0]).await;
    env.committed.lock().clear();
    let n = delete_unreferenced(
        Arc::clone(&env.store),
        Arc::clone(&env.ledger),
        env.is_referenced(),
        &a.manifest_key,
        &a.digests,
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(env.chunk_keys().await, vec![chunk_key(&a.digests[0])]);
}

#[tokio::test]
async fn concurrent_import_and_expunge_never_lose_a_chunk() {
    // Image A is expunged while B (same content) imports: B's manifest must stay readable.
    for _ in 0..20 {
        let env = Arc::new(Env::new());
        let data = patterned(&[1, 2, 3, 4], 0);
        let a = env.import_bytes(&data).await;
        env.committed.lock().clear();
        let p = env.write_file("b.img", &data);
        let env2 = Arc::clone(&env);
        let importer = tokio::spawn(async move {
            let (imp, guard) = import_file(
                Arc::clone(&env2.store),
                Arc::clone(&env2.ledger),
                env2.is_referenced(),
                ImageId::random(),
                &p,
                ImportOptions::new(CS),
            )
            .await
            .unwrap();
            env2.committed.lock().extend(imp.digests.iter().copied());
            drop(guard);
            imp
        });
        delete_unreferenced(
            Arc::clone(&env.store),
            Arc::clone(&env.ledger),
            env.is_referenced(),
            &a.manifest_key,
            &a.digests,
        )
        .await
        .unwrap();
        let b = importer.await.unwrap();
        let img = Image::open(Arc::clone(&env.store), &b.manifest_key)
            .await
            .unwrap();
        assert_eq!(read_all(&img).await, data);
    }
}

#[tokio::test]
async fn sweep_orphans_deletes_unknown_objects_only() {
    let env = Env::new();
    let a = env.import_bytes(&patterned(&[1, 2], 0)).await;
    let b = env.import_bytes(&patterned(&[2, 3], 0)).await;
    env.store
        .put("chunks/zz/not-a-chunk", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let chunks: HashSet<Digest> = a.digests.iter().copied().collect();
    let manifests: HashSet<String> = [a.manifest_key.clone()].into();
    let (c, m) = sweep_orphans(Arc::clone(&env.store), &chunks, &manifests)
        .await
        .unwrap();
    assert_eq!((c, m), (1, 1));
    assert_eq!(env.manifest_keys().await, vec![a.manifest_key.clone()]);
    assert!(!env.manifest_keys().await.contains(&b.manifest_key));
    assert_eq!(
        env.chunk_keys().await.len(),
        3,
        "a's two chunks + the malformed key"
    );
    let img = Image::open(Arc::clone(&env.store), &a.manifest_key)
        .await
        .unwrap();
    assert_eq!(read_all(&img).await, patterned(&[1, 2], 0));
}

#[tokio::test]
async fn bad_sources_and_chunk_sizes_are_rejected_clearly() {
    let env = Env::new();
    let empty = env.write_file("empty.img", b"");
    let e = env
        .import(&empty, ImportOptions::new(CS))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::EmptyFile { .. }), "{e:?}");
    let e = env
        .import(env.dir.path(), ImportOptions::new(CS))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("a directory"), "{e}");
    let e = env
        .import(Path::new("/dev/null"), ImportOptions::new(CS))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("character device"), "{e}");
    let e = env
        .import(&env.dir.path().join("missing"), ImportOptions::new(CS))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Read { .. }), "{e:?}");
    let p = env.write_file("x.img", b"abc");
    for cs in [0, 4096, CS + 1, 32 << 20] {
        let e = env.import(&p, ImportOptions::new(cs)).await.unwrap_err();
        assert!(
            matches!(e, ImageError::InvalidChunkSize { .. }),
            "{cs}: {e:?}"
        );
        assert!(e.to_string().contains("power of two"));
    }
    assert!(env.chunk_keys().await.is_empty());
}

#[tokio::test]
async fn open_rejects_corrupt_manifest() {
    let env = Env::new();
    let imp = env.import_bytes(&patterned(&[1], 0)).await;
    let mut m = env.store.get(&imp.manifest_key).await.unwrap().to_vec();
    let last = m.len() - 1;
    m[last] ^= 1;
    env.store
        .put(&imp.manifest_key, Bytes::from(m))
        .await
        .unwrap();
    let e = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .err()
        .unwrap();
    assert!(matches!(
        e,
        ImageError::Manifest {
            source: ManifestError::BadChecksum,
            ..
        }
    ));
}

#[tokio::test]
async fn truncated_chunk_file_reads_as_eio() {
    let env = Env::new();
    let imp = env.import_bytes(&patterned(&[1], 0)).await;
    let path = env.store.local_path(&chunk_key(&imp.digests[0])).unwrap();
    std::fs::write(&path, b"short").unwrap();
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    let mut buf = vec![0u8; 16];
    let e = img.read(0, &mut buf).await.unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO);
}

/// A DirStore that hides its local paths, like a remote store.
struct NoLocal(DirStore);

#[async_trait]
impl Store for NoLocal {
    fn describe(&self) -> String {
        "nolocal".into()
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.0.get_range(key, range).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.0.put(key, data).await
    }
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.0.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.0.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
}

#[tokio::test]
async fn store_without_local_path_reads_through_get_range() {
    let dir = tempdir();
    let store: Arc<dyn Store> = Arc::new(NoLocal(DirStore::open(dir.path().join("s")).unwrap()));
    let p = dir.path().join("x.img");
    let data = patterned(&[1, 0, 2], 99);
    std::fs::write(&p, &data).unwrap();
    let (imp, _guard) = import_file(
        Arc::clone(&store),
        Arc::new(ChunkLedger::new()),
        Arc::new(|_| false),
        ImageId::random(),
        &p,
        ImportOptions::new(CS),
    )
    .await
    .unwrap();
    let img = Image::open(store, &imp.manifest_key).await.unwrap();
    assert!(!img.has_nowait_path());
    let mut buf = vec![0u8; 300];
    assert!(img.try_read_nowait(0, &mut buf).is_none());
    assert_eq!(read_all(&img).await, data);
    img.read(CS as u64 - 150, &mut buf).await.unwrap();
    assert_eq!(buf, &data[CSU - 150..CSU + 150]);
}

#[tokio::test]
async fn progress_reports_every_byte() {
    let env = Env::new();
    let data = patterned(&[1, 0, 2], 5);
    let p = env.write_file("x.img", &data);
    let mut opts = ImportOptions::new(CS);
    let last = Arc::new(parking_lot::Mutex::new((0u64, 0u64)));
    let l2 = Arc::clone(&last);
    opts.progress = Some(Arc::new(move |done, total| {
        let mut l = l2.lock();
        assert!(done >= l.0);
        *l = (done, total);
    }));
    env.import(&p, opts).await.unwrap();
    assert_eq!(*last.lock(), (data.len() as u64, data.len() as u64));
}

/// Arbitrary image content: a sequence of regions, each random, zero, or a repeat.
fn content() -> impl Strategy<Value = Vec<u8>> {
    let region = prop_oneof![
        (1usize..3 * CSU).prop_map(|n| vec![0u8; n]),
        (1usize..2 * CSU, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        proptest::collection::vec(any::<u8>(), 1..5000),
        Just(vec![0u8; CSU]),
        Just(vec![0x5Au8; CSU]),
    ];
    proptest::collection::vec(region, 1..6).prop_map(|rs| rs.concat())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn import_read_round_trip(
        data in content(),
        reads in proptest::collection::vec((any::<u64>(), 1usize..(3 * CSU)), 1..12),
    ) {
        runtime().block_on(async {
            let env = Env::new();
            let imp = env.import_bytes(&data).await;
            let img = Image::open(Arc::clone(&env.store), &imp.manifest_key).await.unwrap();
            prop_assert_eq!(img.size(), data.len() as u64);
            prop_assert_eq!(read_all(&img).await, data.clone());
            for (off, len) in reads {
                let off = (off % data.len() as u64) as usize;
                let len = len.min(data.len() - off);
                let mut buf = vec![0xEEu8; len];
                img.read(off as u64, &mut buf).await.unwrap();
                prop_assert_eq!(&buf[..], &data[off..off + len]);
                let mut buf = vec![0xEEu8; len];
                // Every fd is cached after read_all, so the hot path must serve it.
                img.try_read_nowait(off as u64, &mut buf).unwrap().unwrap();
                prop_assert_eq!(&buf[..], &data[off..off + len]);
            }
            // Holes reported exactly: extent kinds match per-chunk zero-ness.
            let ext = img.extents(0, img.size(), usize::MAX);
            let mut pos = 0u64;
            for e in &ext {
                prop_assert_eq!(e.offset, pos);
                pos += e.len;
                let bytes = &data[e.offset as usize..(e.offset + e.len) as usize];
                match e.kind {
                    ExtentKind::Hole => prop_assert!(bytes.iter().all(|&b| b == 0)),
                    ExtentKind::Data => {
                        for c in bytes.chunks(CSU) {
                            prop_assert!(c.iter().any(|&b| b != 0));
                        }
                    }
                }
            }
            prop_assert_eq!(pos, data.len() as u64);
            for w in ext.windows(2) {
                prop_assert_ne!(w[0].kind, w[1].kind);
            }
            // Stored chunks: exactly the distinct non-zero chunks.
            let distinct: HashSet<Digest> = data
                .chunks(CSU)
                .filter(|c| c.iter().any(|&b| b != 0))
                .map(Digest::of)
                .collect();
            prop_assert_eq!(env.chunk_keys().await.len(), distinct.len());
            Ok(())
        })?;
    }
}

#[test]
fn failing_store_put_cleans_up_and_reports() {
    /// Fails every put after the first `ok_puts`.
    struct Flaky {
        inner: DirStore,
        ok_puts: std::sync::atomic::AtomicUsize,
    }
    #[async_trait]
    impl Store for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
            self.inner.get_range(key, range).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
            let left = self.ok_puts.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StoreError::Io {
                    key: key.into(),
                    source: std::io::Error::other("injected"),
                });
            }
            self.ok_puts.store(left - 1, Ordering::SeqCst);
            self.inner.put(key, data).await
        }
        async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        fn local_path(&self, key: &str) -> Option<PathBuf> {
            self.inner.local_path(key)
        }
    }
    runtime().block_on(async {
        let dir = tempdir();
        let store = Arc::new(Flaky {
            inner: DirStore::open(dir.path().join("s")).unwrap(),
            ok_puts: 3.into(),
        });
        let p = dir.path().join("x.img");
        std::fs::write(&p, patterned(&[1, 2, 3, 4, 5, 6], 0)).unwrap();
        let e = import_file(
            store.clone(),
            Arc::new(ChunkLedger::new()),
            Arc::new(|_| false),
            ImageId::random(),
            &p,
            ImportOptions::new(CS),
        )
        .await
        .err()
        .unwrap();
        assert!(
            matches!(e, ImageError::Store(StoreError::Io { .. })),
            "{e:?}"
        );
        assert!(store.list("").await.unwrap().is_empty());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_import_is_cleaned_up() {
    let env = Arc::new(Env::new());
    let shared = env.import_bytes(&patterned(&[1], 0)).await;
    let p = env.write_file(
        "big.img",
        &patterned(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 0),
    );
    let mut opts = ImportOptions::new(CS);
    let started = Arc::new(tokio::sync::Notify::new());
    let s2 = Arc::clone(&started);
    opts.progress = Some(Arc::new(move |done, _| {
        if done == 4 * CS as u64 {
            s2.notify_one();
            // Hold the import here so the abort lands mid-way.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }));
    let env2 = Arc::clone(&env);
    let task = tokio::spawn(async move { env2.import(&p, opts).await });
    started.notified().await;
    task.abort();
    let _ = task.await;
    let want = vec![chunk_key(&shared.digests[0])];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while env.chunk_keys().await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            env.chunk_keys().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(env.manifest_keys().await, vec![shared.manifest_key.clone()]);
    // Stays clean: no late write re-creates a chunk.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(env.chunk_keys().await, want);
    assert_eq!(env.ledger.holders(&Digest::of(&patterned(&[2], 0))), 0);
}

#[tokio::test]
async fn missing_chunk_reads_as_eio() {
    let env = Env::new();
    let imp = env.import_bytes(&patterned(&[1, 2], 0)).await;
    env.store.delete(&chunk_key(&imp.digests[0])).await.unwrap();
    env.store.delete(&chunk_key(&imp.digests[1])).await.unwrap();
    let img = Image::open(Arc::clone(&env.store), &imp.manifest_key)
        .await
        .unwrap();
    let mut buf = vec![0u8; 16];
    let e = img.read(0, &mut buf).await.unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO);
    assert!(img.try_read_nowait(0, &mut buf).is_none());
}

#[tokio::test]
async fn nowait_path_works_on_disk_file_systems() {
    // /tmp is usually a disk file system (RWF_NOWAIT supported), unlike tmpfs.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(DirStore::open(dir.path().join("s")).unwrap());
    let data = patterned(&[1, 0, 2, 3], 77);
    let p = dir.path().join("x.img");
    std::fs::write(&p, &data).unwrap();
    let (imp, _g) = import_file(
        Arc::clone(&store),
        Arc::new(ChunkLedger::new()),
        Arc::new(|_| false),
        ImageId::random(),
        &p,
        ImportOptions::new(CS),
    )
    .await
    .unwrap();
    let img = Image::open(store, &imp.manifest_key).await.unwrap();
    assert_eq!(read_all(&img).await, data);
    // Just written and read: in page cache, so the hot path serves it (or reports the file
    // system cannot do non-blocking reads).
    let mut buf = vec![0u8; 2 * CSU];
    match img.try_read_nowait(CS as u64 + 3, &mut buf) {
        Some(r) => {
            r.unwrap();
            assert_eq!(buf, &data[CSU + 3..3 * CSU + 3]);
        }
        None => assert!(!img.has_nowait_path()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_import_skips_head_for_chunks_known_present() {
    use crate::device::mem::MemDevice;
    use crate::store::fault::{Fault, FaultStore, Op, Rule, When};
    use crate::store::mem::MemStore;
    let data = patterned(&[1, 2, 0, 3], 100);
    let known: HashSet<Digest> = data
        .chunks(CSU)
        .filter(|c| !import::is_all_zero(c))
        .map(Digest::of)
        .collect();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new()), 3));
    store.add_rule(Rule::new(Fault::Permanent, When::Always, Some(Op::Head)));
    let run = |known: Option<Arc<HashSet<Digest>>>| {
        let store: Arc<dyn Store> = store.clone();
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(data.clone()));
        async move {
            import_device(
                store,
                Arc::new(ChunkLedger::new()),
                Arc::new(|_: &Digest| true),
                ImageId::random(),
                dev,
                "test device".into(),
                ImportOptions {
                    known_present: known,
                    ..ImportOptions::new(CS)
                },
            )
            .await
        }
    };

    let all_known = run(Some(Arc::new(known.clone()))).await;
    let mut some = known.clone();
    let dropped = *some.iter().next().unwrap();
    some.remove(&dropped);
    let one_unknown = run(Some(Arc::new(some))).await;

    let (imported, _guard) = all_known.expect("no head needed");
    assert_eq!(imported.chunks_new, 0);
    assert_eq!(imported.chunks_hole, 1);
    assert!(
        one_unknown.is_err(),
        "the unknown chunk needs a head, which fails"
    );
}
