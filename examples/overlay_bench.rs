//! Micro-benchmarks of the overlay engine on a directory (default `/dev/shm`).
//!
//! `cargo run --release --example overlay_bench -- [DIR]`
//!
//! 1. Random 4 KiB reads through `OverlayVolume::try_read_nowait` with 1 vs 16 snapshots
//!    (read cost must not depend on the number of snapshots).
//! 2. Random 4 KiB writes, 32 in flight, through `WritableDevice::write`.
//! 3. Sequential 1 MiB writes, 8 in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcache::device::BlockDevice;
use imgcache::overlay::sim::SimRng;
use imgcache::overlay::volume::{MemBase, OverlayVolume};
use imgcache::overlay::Overlay;

const B: u64 = 4096;

fn volume(dir: &std::path::Path, name: &str, size: u64) -> Arc<OverlayVolume> {
    let p = dir.join(name);
    let _ = std::fs::remove_dir_all(&p);
    let base = Arc::new(MemBase(vec![0x5a; size as usize]));
    let ov = Overlay::create_dir(&p, size, size).expect("create overlay");
    Arc::new(OverlayVolume::new(Arc::new(ov), base))
}

fn read_bench(dir: &std::path::Path, snapshots: usize) -> f64 {
    let size = 256 << 20;
    let vol = volume(dir, &format!("read{snapshots}"), size);
    let ov = vol.overlay().clone();
    let blocks = size / B;
    let mut rng = SimRng::new(7);
    let data = vec![1u8; 1 << 20];
    let base = vec![0u8; 0];
    for off in (0..size).step_by(1 << 20) {
        ov.write(off, &data, false, &base).unwrap();
    }
    for s in 0..snapshots {
        ov.snapshot(&format!("s{s}")).unwrap();
        // Diverge: overwrite some blocks after each snapshot (redirect-on-write).
        for _ in 0..blocks / 32 {
            let l = rng.below(blocks);
            ov.write(l * B, &data[..B as usize], false, &base).unwrap();
        }
    }
    ov.flush().unwrap();
    let mut buf = vec![0u8; B as usize];
    let n = 400_000;
    let t = Instant::now();
    for _ in 0..n {
        let l = rng.below(blocks);
        vol.try_read_nowait(l * B, &mut buf).unwrap().unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn write_bench(vol: Arc<OverlayVolume>, bs: u64, depth: usize, seq: bool) -> (f64, u64) {
    let size = vol.size();
    let dur = Duration::from_secs(5);
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..depth {
        let vol = vol.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SimRng::new(t as u64 + 1);
            let data = vec![t as u8; bs as usize];
            let mut ops = 0u64;
            while start.elapsed() < dur {
                let off = if seq {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (i * bs) % size
                } else {
                    rng.below(size / bs) * bs
                };
                vol.writable()
                    .unwrap()
                    .write(off, &data, false)
                    .await
                    .unwrap();
                ops += 1;
            }
            ops
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await.unwrap();
    }
    vol.writable().unwrap().flush().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    (ops as f64 / secs, ops)
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("/dev/shm".into()))
        .join(format!("imgcache-overlay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let r1 = read_bench(&dir, 1);
    let r16 = read_bench(&dir, 16);
    println!("random 4K reads (inline, RWF_NOWAIT): 1 snapshot {r1:.0} IOPS, 16 snapshots {r16:.0} IOPS (ratio {:.2})", r16 / r1);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let vol = volume(&dir, "randw", 1 << 30);
        let (iops, _) = write_bench(vol, B, 32, false).await;
        let _ = std::fs::remove_dir_all(dir.join("randw"));
        println!("random 4K writes, iodepth 32: {iops:.0} IOPS");
        let vol = volume(&dir, "seqw", 4 << 30);
        let (ops, _) = write_bench(vol.clone(), 1 << 20, 8, true).await;
        drop(vol);
        println!("sequential 1M writes, iodepth 8: {:.2} GiB/s", ops / 1024.0);
    });
    let _ = std::fs::remove_dir_all(&dir);
}
