//! Cache behaviour against an in-memory chunk source that counts and can fail or hang.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::*;
use crate::error::ErrorKind;

const CS: u32 = 64 * 1024;

struct TestSource {
    data: Vec<u8>,
    chunk: usize,
    holes: Vec<u64>,
    fetches: AtomicU64,
    fail: AtomicBool,
    hang: AtomicBool,
    delay_ms: AtomicU64,
}

impl TestSource {
    fn new(size: usize, holes: Vec<u64>) -> Arc<TestSource> {
        let mut data = vec![0u8; size];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for &h in &holes {
            let s = h as usize * CS as usize;
            let e = (s + CS as usize).min(size);
            data[s..e].fill(0);
        }
        Arc::new(TestSource {
            data,
            chunk: CS as usize,
            holes,
            fetches: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        })
    }
    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

struct SourceHandle(Arc<TestSource>);

impl ChunkSource for SourceHandle {
    fn fetch(&self, index: u64, len: usize) -> BoxFuture<'static, Result<Bytes, SourceError>> {
        let s = self.0.clone();
        Box::pin(async move {
            s.fetches.fetch_add(1, Ordering::SeqCst);
            let d = s.delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if s.hang.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if s.fail.load(Ordering::SeqCst) {
                return Err(SourceError {
                    kind: ErrorKind::Unavailable,
                    message: "store down".into(),
                    source: None,
                });
            }
            let start = index as usize * s.chunk;
            Ok(Bytes::copy_from_slice(&s.data[start..start + len]))
        })
    }
    fn has_data(&self, index: u64) -> bool {
        !self.0.holes.contains(&index)
    }
}

/// The cache of image `key` over `src`, with the test chunk size.
fn open(cache: &ChunkCache, key: &str, src: &Arc<TestSource>) -> Arc<CachedImage> {
    cache
        .open_image(
            key,
            src.data.len() as u64,
            CS,
            Arc::new(SourceHandle(src.clone())),
        )
        .unwrap()
}

fn config(dir: &std::path::Path, max: u64) -> CacheConfig {
    let mut c = CacheConfig::new(dir.to_path_buf(), max);
    c.fetch_timeout = Duration::from_millis(300);
    c.read_timeout = Duration::from_millis(600);
    c.readahead_chunks = 0;
    c
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

async fn read(img: &Arc<CachedImage>, offset: u64, len: usize) -> Result<Vec<u8>, CacheError> {
    let mut out = vec![0u8; len];
    let cs = img.chunk_size() as u64;
    let mut done = 0usize;
    while done < len {
        let pos = offset + done as u64;
        let idx = pos / cs;
        let off = (pos % cs) as usize;
        let n = (len - done).min(img.chunk_len(idx) - off);
        let buf = &mut out[done..done + n];
        match img.try_read(idx, off, buf) {
            Some(r) => r.map_err(|e| CacheError::io("t", e))?,
            None => img.read(idx, off, buf).await?,
        }
        done += n;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_missing_chunk_fetch_it_once() {
    let dir = tmp();
    let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
    let src = TestSource::new(4 * CS as usize, vec![]);
    src.delay_ms.store(50, Ordering::SeqCst);
    let img = open(&cache, "img", &src);
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            read(&img, 4096 * i, 4096).await.unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got, src.data[4096 * i..4096 * (i + 1)]);
    }
    assert_eq!(src.fetches(), 1);
    assert!(img.is_cached(0));
}

#[tokio::test]
async fn reopened_cache_serves_verified_chunks_without_fetching() {
    let dir = tmp();
    let src = TestSource::new(3 * CS as usize + 100, vec![]);
    {
        let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
        let img = open(&cache, "img", &src);
        assert_eq!(read(&img, 0, src.data.len()).await.unwrap(), src.data);
        assert_eq!(src.fetches(), 4);
    }
    let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
    assert_eq!(cache.used_bytes(), src.data.len() as u64);
    let img = open(&cache, "img", &src);
    assert_eq!(read(&img, 0, src.data.len()).await.unwrap(), src.data);
    assert_eq!(
        src.fetches(),
        4,
        "a restart must not fetch cached chunks again"
    );
}

#[tokio::test]
async fn corrupted_cache_bytes_are_detected_evicted_and_fetched_again() {
    let dir = tmp();
    let src = TestSource::new(2 * CS as usize, vec![]);
    let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
    let img = open(&cache, "img", &src);
    read(&img, 0, 2 * CS as usize).await.unwrap();
    assert_eq!(src.fetches(), 2);

    // Flip bytes in the middle of chunk 1, as a failing disk would.
    let path = dir.path().join("img.data");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = CS as usize + 5000;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let got = read(&img, CS as u64 + 4096, 4096).await.unwrap();
    assert_eq!(got, src.data[CS as usize + 4096..CS as usize + 8192]);
    assert_eq!(cache.counters().corrupt.load(Ordering::SeqCst), 1);
    assert_eq!(src.fetches(), 3, "the corrupt chunk is fetched again");
    // Healed: reads are correct and do not fetch again.
    assert_eq!(read(&img, 0, 2 * CS as usize).await.unwrap(), src.data);
    assert_eq!(src.fetches(), 3);
}

#[tokio::test]
async fn a_store_that_hangs_fails_reads_within_the_timeout_and_cached_data_stays_readable() {
    let dir = tmp();
    let src = TestSource::new(2 * CS as usize, vec![]);
    let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
    let img = open(&cache, "img", &src);
    read(&img, 0, 100).await.unwrap();
    src.hang.store(true, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    let err = read(&img, CS as u64, 100).await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a hung store must not hang the reader"
    );
    assert_eq!(
        crate::error::Classify::kind(&err),
        ErrorKind::Timeout,
        "{err}"
    );
    assert_eq!(read(&img, 0, 100).await.unwrap(), src.data[..100]);
}

#[tokio::test]
async fn a_failed_fetch_is_not_stuck_in_flight() {
    let dir = tmp();
    let src = TestSource::new(CS as usize, vec![]);
    let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
    let img = open(&cache, "img", &src);
    src.fail.store(true, Ordering::SeqCst);
    let err = read(&img, 0, 10).await.unwrap_err();
    assert_eq!(crate::error::Classify::kind(&err), ErrorKind::Unavailable);
    src.fail.store(false, Ordering::SeqCst);
    assert_eq!(read(&img, 0, 10).await.unwrap(), src.data[..10]);
    assert_eq!(src.fetches(), 2);
}

#[tokio::test]
async fn cache_stays_bounded_and_keeps_pinned_images() {
    let dir = tmp();
    let max = 10 * CS as u64;
    let cache = ChunkCache::open(config(dir.path(), max)).unwrap();
    let pinned_src = TestSource::new(4 * CS as usize, vec![]);
    let other_src = TestSource::new(32 * CS as usize, vec![]);
    cache.set_pinned("pinned", true).unwrap();
    let p = open(&cache, "pinned", &pinned_src);
    let o = open(&cache, "other", &other_src);
    read(&p, 0, 4 * CS as usize).await.unwrap();
    for i in 0..32u64 {
        read(&o, i * CS as u64, 10).await.unwrap();
        assert!(
            cache.used_bytes() <= max,
            "used {} above max {max}",
            cache.used_bytes()
        );
    }
    for i in 0..4 {
        assert!(p.is_cached(i), "a pinned chunk was evicted");
    }
    assert!(o.is_cached(31), "the most recent chunk stays");
    assert!(!o.is_cached(0), "the least recently used chunk goes");
    assert!(cache.counters().evicted.load(Ordering::SeqCst) > 0);
    // Evicted data reads correctly again.
    assert_eq!(read(&o, 0, 100).await.unwrap(), other_src.data[..100]);
}

#[tokio::test]
async fn warm_fetches_every_data_chunk_and_skips_holes() {
    let dir = tmp();
    let src = TestSource::new(8 * CS as usize, vec![2, 5]);
    let cache = ChunkCache::open(config(dir.path(), 1 << 30)).unwrap();
    let img = open(&cache, "img", &src);
    read(&img, 0, 10).await.unwrap();
    let last = Arc::new(AtomicU64::new(0));
    let l = last.clone();
    let report = img
        .warm(
            4,
            None,
            Some(Arc::new(move |done, total| {
                assert!(done <= total);
                l.store(done, Ordering::SeqCst);
            })),
        )
        .await
        .unwrap();
    assert_eq!(report.data_chunks, 6);
    assert_eq!(report.already_cached, 1);
    assert_eq!(report.fetched_chunks, 5);
    assert_eq!(last.load(Ordering::SeqCst), 6 * CS as u64);
    assert_eq!(src.fetches(), 6, "holes are never fetched");
    let st = cache.status();
    assert_eq!(st.images[0].cached_chunks, 6);
    assert_eq!(st.images[0].data_chunks, Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_prefetch_the_next_chunks() {
    let dir = tmp();
    let mut cfg = config(dir.path(), 1 << 30);
    cfg.readahead_chunks = 4;
    let cache = ChunkCache::open(cfg).unwrap();
    let src = TestSource::new(16 * CS as usize, vec![]);
    let img = open(&cache, "img", &src);
    read(&img, 0, CS as usize).await.unwrap();
    read(&img, CS as u64, CS as usize).await.unwrap();
    read(&img, 2 * CS as u64, CS as usize).await.unwrap();
    for _ in 0..100 {
        if img.is_cached(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        img.is_cached(3) && img.is_cached(5),
        "read-ahead did not fetch ahead"
    );
    assert!(!img.is_cached(12), "read-ahead went too far");
}
