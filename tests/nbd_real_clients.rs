//! Real NBD clients (libnbd's `nbdinfo`/`nbdcopy`, `qemu-img`) against the NBD server alone,
//! running in-process on a unix socket in a temp dir. Each test is skipped, with a message,
//! when its tool is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use imgcache::device::mem::MemDevice;
use imgcache::export::nbd::NbdServer;
use imgcache::export::{Export, ExportListing, ExportRegistry};

const SIZE: usize = 4 << 20;
const BLOCK: usize = 64 * 1024;

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

/// Image contents: pattern data, with every third 64 KiB block all zeros (a hole).
fn image() -> Vec<u8> {
    (0..SIZE)
        .map(|i| {
            if (i / BLOCK) % 3 == 1 {
                0
            } else {
                (i % 251) as u8 | 1
            }
        })
        .collect()
}

fn holes() -> Vec<std::ops::Range<u64>> {
    (0..SIZE / BLOCK)
        .filter(|b| b % 3 == 1)
        .map(|b| (b * BLOCK) as u64..((b + 1) * BLOCK) as u64)
        .collect()
}

/// A running server; dropped at the end of the test (its runtime thread ends with it).
struct Served {
    dir: tempfile::TempDir,
    socket: PathBuf,
    _shutdown: tokio::sync::watch::Sender<bool>,
    _thread: std::thread::JoinHandle<()>,
}

impl Served {
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let dev = MemDevice::new(image())
        .with_holes(holes())
        .with_remote((SIZE - BLOCK) as u64..SIZE as u64);
    let registry = Arc::new(OneExport(Export {
        name: "disk".into(),
        description: "real client test disk".into(),
        device: Arc::new(dev),
    }));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sock = socket.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::bind(&sock).unwrap();
            ready_tx.send(()).unwrap();
            NbdServer::new(registry)
                .run_unix(listener, rx)
                .await
                .unwrap();
        });
    });
    ready_rx.recv().unwrap();
    Served {
        dir,
        socket,
        _shutdown: tx,
        _thread: thread,
    }
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: `{tool}` is not installed");
    }
    found
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn write_image(dir: &Path) -> PathBuf {
    let p = dir.join("orig.img");
    std::fs::write(&p, image()).unwrap();
    p
}

#[test]
fn nbdinfo_lists_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let s = serve();
    let out = run(Command::new("nbdinfo").arg("--list").arg(s.uri("")));
    assert!(out.contains("export=\"disk\""), "{out}");
    assert!(out.contains("real client test disk"), "{out}");
}

#[test]
fn nbdinfo_shows_size_flags_and_contexts() {
    if !have("nbdinfo") {
        return;
    }
    let s = serve();
    let out = run(Command::new("nbdinfo").arg(s.uri("disk")));
    assert!(out.contains(&format!("export-size: {SIZE}")), "{out}");
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("imgcache:residency"), "{out}");
    assert!(out.contains("block_size_maximum: 33554432"), "{out}");
}

#[test]
fn nbdinfo_map_shows_residency() {
    if !have("nbdinfo") {
        return;
    }
    let s = serve();
    let out = run(Command::new("nbdinfo")
        .arg("--map=imgcache:residency")
        .arg(s.uri("disk")));
    // One local run, then the last block remote (flag 1).
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let last: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        last[..3],
        [&*(SIZE - BLOCK).to_string(), &*BLOCK.to_string(), "1"]
    );
}

#[test]
fn nbdcopy_copies_the_image_exactly() {
    if !have("nbdcopy") {
        return;
    }
    let s = serve();
    let dst = s.dir.path().join("copy.img");
    run(Command::new("nbdcopy").arg(s.uri("disk")).arg(&dst));
    assert!(std::fs::read(&dst).unwrap() == image(), "copy differs");
}

#[test]
fn qemu_img_compare_finds_identical_images() {
    if !have("qemu-img") {
        return;
    }
    let s = serve();
    let orig = write_image(s.dir.path());
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&orig)
        .arg(s.uri("disk")));
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn qemu_img_map_shows_holes() {
    if !have("qemu-img") {
        return;
    }
    let s = serve();
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(s.uri("disk")));
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let holes: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let want: Vec<(u64, u64)> = hole_extents();
    assert_eq!(holes, want, "{out}");
    assert!(map
        .iter()
        .filter(|e| e["data"] == false)
        .all(|e| e["zero"] == true));
}

fn hole_extents() -> Vec<(u64, u64)> {
    holes()
        .into_iter()
        .map(|r| (r.start, r.end - r.start))
        .collect()
}
