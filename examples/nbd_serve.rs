//! Serve one file as a read-only NBD export on a unix socket (or TCP), for benchmarks and
//! real-client tests of the NBD server alone (no daemon, no cache).
//!
//! ```text
//! cargo run --release --example nbd_serve -- IMAGE SOCKET [--name NAME] [--mem] [--tcp ADDR] [--busy-poll-us N]
//! ```
//!
//! By default reads go to the file with `preadv2(RWF_NOWAIT)` inline, falling back to a
//! blocking-pool `pread`. With `--mem` the file is loaded into a [`MemDevice`] whose
//! all-zero 64 KiB blocks are reported as holes (so `qemu-img map` shows them).
//! The socket file is removed first if it exists, and left behind on exit.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use futures::future::BoxFuture;
use imgcache::device::mem::MemDevice;
use imgcache::device::{BlockDevice, Extent, ExtentKind, Residency};
use imgcache::export::nbd::NbdServer;
use imgcache::export::{Export, ExportListing, ExportRegistry};

/// A read-only device over a file.
struct FileDevice {
    file: Arc<File>,
    size: u64,
    /// On tmpfs, `RWF_NOWAIT` fails with `EOPNOTSUPP` (Linux 6.18) but reads never wait for
    /// a disk, so a plain `pread` is as good.
    tmpfs: bool,
}

fn on_tmpfs(file: &File) -> bool {
    // SAFETY: an all-zero `statfs` is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `statfs`; the fd is open.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if self.tmpfs {
            return Some(self.file.read_exact_at(buf, offset));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let iov = libc::iovec {
                iov_base: buf[done..].as_mut_ptr().cast(),
                iov_len: buf.len() - done,
            };
            // SAFETY: `iov` points into `buf`, which is valid for writes of `iov_len` bytes
            // for the whole call; the fd is open for as long as `self.file` lives.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => None,
                    _ => Some(Err(err)),
                };
            }
            if n == 0 {
                return Some(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            done += n as usize;
        }
        Some(Ok(()))
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<()>> {
        let file = self.file.clone();
        let len = buf.len();
        Box::pin(async move {
            let data = tokio::task::spawn_blocking(move || {
                let mut v = vec![0u8; len];
                file.read_exact_at(&mut v, offset).map(|_| v)
            })
            .await
            .map_err(io::Error::other)??;
            buf.copy_from_slice(&data);
            Ok(())
        })
    }

    fn extents(&self, offset: u64, len: u64, _max: usize) -> Vec<Extent> {
        vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
            residency: Residency::Local,
        }]
    }
}

struct OneExport(Export);

impl ExportRegistry for OneExport {
    fn list(&self) -> Vec<ExportListing> {
        vec![ExportListing {
            name: self.0.name.clone(),
            description: self.0.description.clone(),
        }]
    }
    fn open(&self, name: &str) -> Option<Export> {
        (name == self.0.name).then(|| self.0.clone())
    }
}

fn mem_device(path: &str) -> io::Result<MemDevice> {
    const BLOCK: usize = 64 * 1024;
    let data = std::fs::read(path)?;
    let holes: Vec<_> = data
        .chunks(BLOCK)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|b| *b == 0))
        .map(|(i, c)| (i * BLOCK) as u64..(i * BLOCK + c.len()) as u64)
        .collect();
    Ok(MemDevice::new(data).with_holes(holes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let (mut pos, mut name, mut mem, mut tcp) = (Vec::new(), "img".to_string(), false, None);
    let mut busy_poll_us = 0u64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next().unwrap_or_default(),
            "--mem" => mem = true,
            "--busy-poll-us" => {
                busy_poll_us = args.next().and_then(|v| v.parse().ok()).unwrap_or(0)
            }
            "--tcp" => tcp = args.next(),
            _ => pos.push(a),
        }
    }
    let [image, socket] = <[String; 2]>::try_from(pos).map_err(|_| {
        anyhow::anyhow!("usage: nbd_serve IMAGE SOCKET [--name NAME] [--mem] [--tcp ADDR]")
    })?;
    let device: Arc<dyn BlockDevice> = if mem {
        Arc::new(mem_device(&image)?)
    } else {
        let file = File::open(&image)?;
        let size = file.metadata()?.len();
        let tmpfs = on_tmpfs(&file);
        Arc::new(FileDevice {
            file: Arc::new(file),
            size,
            tmpfs,
        })
    };
    let registry = Arc::new(OneExport(Export {
        name,
        description: format!("{image} served by nbd_serve"),
        device,
    }));
    let server =
        NbdServer::with_busy_poll(registry, std::time::Duration::from_micros(busy_poll_us));
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    if let Some(addr) = tcp {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        server.run_tcp(listener, rx).await?;
    } else {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)?;
        eprintln!("nbd_serve: listening on {socket}");
        server.run_unix(listener, rx).await?;
    }
    Ok(())
}
