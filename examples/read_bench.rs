//! Micro-benchmark of import and of the image read path on tmpfs.
//!
//! `cargo run --release --example read_bench [SIZE_MIB] [SECONDS]`
//!
//! Creates a SIZE_MIB (default 1024) random file in /dev/shm (or `$BENCH_DIR`), imports it with 1 MiB chunks,
//! then measures `try_read_nowait` 4 KiB random reads (1 and 2 threads) and 1 MiB
//! sequential reads, and the blocking `read` path for comparison.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcache::device::BlockDevice;
use imgcache::image::{import_file, ChunkLedger, FdCache, Image, ImportOptions};
use imgcache::store::dir::DirStore;
use imgcache::store::Store;
use imgcache::types::ImageId;

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let secs: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let size = size_mib << 20;
    let dir = tempfile::Builder::new()
        .prefix("imgcache-bench-")
        .tempdir_in("/dev/shm")?;
    let src = dir.path().join("src.img");
    {
        let mut data = vec![0u8; size as usize];
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for w in data.chunks_exact_mut(8) {
            w.copy_from_slice(&xorshift(&mut s).to_le_bytes());
        }
        // A few holes.
        for i in (0..size_mib).step_by(10) {
            let o = (i << 20) as usize;
            data[o..o + (1 << 20)].fill(0);
        }
        std::fs::write(&src, &data)?;
    }
    imgcache::image::raise_fd_limit();
    let rt = tokio::runtime::Runtime::new()?;
    let store: Arc<dyn Store> = Arc::new(DirStore::open(dir.path().join("store"))?);
    let t = Instant::now();
    let (imp, _guard) = rt.block_on(import_file(
        Arc::clone(&store),
        Arc::new(ChunkLedger::new()),
        Arc::new(|_| false),
        ImageId::random(),
        &src,
        ImportOptions {
            chunk_size: 1 << 20,
            expected: None,
            progress: None,
            cancel: Arc::new(AtomicBool::new(false)),
            known_present: None,
        },
    ))?;
    let el = t.elapsed().as_secs_f64();
    println!(
        "import: {size_mib} MiB in {el:.2}s = {:.0} MiB/s ({} chunks, {} holes)",
        size_mib as f64 / el,
        imp.chunks_total,
        imp.chunks_hole
    );
    let img = rt.block_on(Image::open(Arc::clone(&store), &imp.manifest_key))?;
    // Warm the fd cache through the blocking path.
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        rt.block_on(img.read(off, &mut buf))?;
    }

    let dur = Duration::from_secs_f64(secs);
    for threads in [1usize, 2] {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads)
                .map(|i| {
                    let img = &img;
                    sc.spawn(move || {
                        let mut b = [0u8; 4096];
                        let mut s = 0x1234_5678 + i as u64;
                        let mut n = 0u64;
                        let blocks = size / 4096;
                        while t.elapsed() < dur {
                            for _ in 0..1024 {
                                let off = (xorshift(&mut s) % blocks) * 4096;
                                img.try_read_nowait(off, &mut b).unwrap().unwrap();
                                n += 1;
                            }
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let el = t.elapsed().as_secs_f64();
        println!(
            "try_read_nowait 4K random, {threads} thread(s): {:.0} IOPS ({:.2} us/read/thread)",
            total as f64 / el,
            el * 1e6 * threads as f64 / total as f64
        );
    }

    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < dur {
        for off in (0..size).step_by(1 << 20) {
            img.try_read_nowait(off, &mut buf).unwrap().unwrap();
            bytes += 1 << 20;
        }
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "try_read_nowait 1M sequential, 1 thread: {:.2} GiB/s",
        bytes as f64 / el / (1u64 << 30) as f64
    );

    // Fd cache far smaller than the image: almost every read opens its chunk inline.
    let small = rt.block_on(Image::open_with_fd_cache(
        Arc::clone(&store),
        &imp.manifest_key,
        Arc::new(FdCache::new(64)),
    ))?;
    let t = Instant::now();
    let (mut n, mut fallback) = (0u64, 0u64);
    let mut s = 7u64;
    let mut b4 = [0u8; 4096];
    while t.elapsed() < dur {
        let off = (xorshift(&mut s) % (size / 4096)) * 4096;
        if small.try_read_nowait(off, &mut b4).is_none() {
            fallback += 1;
        }
        n += 1;
    }
    println!(
        "try_read_nowait 4K random, fd-cache thrashing (64 fds): {:.0} IOPS, {fallback} fallbacks",
        n as f64 / t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut n = 0u64;
    let mut s = 42u64;
    let mut b = vec![0u8; 4096];
    while t.elapsed() < dur {
        let off = (xorshift(&mut s) % (size / 4096)) * 4096;
        rt.block_on(img.read(off, &mut b))?;
        n += 1;
    }
    println!(
        "read (blocking pool) 4K random: {:.0} IOPS",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}
