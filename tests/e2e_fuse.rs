//! End to end: the FUSE export read and written by real tools (cmp, dd, fio, qemu-img,
//! fallocate) on a real mount.
//!
//! Two set-ups: the daemon (`imgcache serve`, mounting on `STATE/mnt`) for images and for
//! volumes made with `imgcache volume create` (`MOUNT/volumes/NAME`: fio verify, FUSE vs NBD,
//! fsync durability across SIGKILL, punch hole, one writer, a VM booting from the file), and
//! the library's `FuseExport` mounted in this process over a test registry whose volume is a
//! real copy-on-write `OverlayVolume`, served by the NBD server too, for writes.
//!
//! Needs /dev/fuse and root (the mount is made with mount(2)); without them every test here
//! prints a loud SKIPPED line and passes.

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{have, run_ok, tempdir, write_image, Daemon, Rng};
use imgcache::device::BlockDevice;
use imgcache::export::fuse::FuseExport;
use imgcache::export::nbd::NbdServer;
use imgcache::export::{Export, ExportListing, ExportRegistry};
use imgcache::overlay::volume::{MemBase, OverlayVolume};
use imgcache::overlay::Overlay;
use parking_lot::Mutex;

const MIB: u64 = 1 << 20;

/// Whether FUSE mounts can be made here; prints why not.
fn fuse_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    if !(root && dev) {
        eprintln!(
            "\n\n*** SKIPPED: FUSE tests need root and a usable /dev/fuse (root: {root}, /dev/fuse: {dev}) ***\n"
        );
    }
    root && dev
}

fn require(tools: &[&str]) {
    for t in tools {
        assert!(
            have(t),
            "{t} is not installed: run the suite with scripts/test.sh, which installs it"
        );
    }
}

fn add(d: &Daemon, name: &str, file: &Path) {
    d.cli_ok(&["image", "add", name, "--file", file.to_str().unwrap()]);
}

/// Wait (at most 5 s) until `path` exists or not, as asked.
fn wait_exists(path: &Path, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() != want {
        assert!(
            Instant::now() < deadline,
            "{} still {} after 5 s",
            path.display(),
            if want { "missing" } else { "present" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let p = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(p))
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn image_file_has_source_bytes_size_and_mode() {
    if !fuse_usable() {
        return;
    }
    require(&["cmp"]);
    let d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, 24 * MIB + 4096, &[(2 * MIB, 3 * MIB)], 7);
    add(&d, "deb", &src);

    let file = d.mnt().join("images/deb");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), 24 * MIB + 4096);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
    assert!(meta.modified().unwrap() > std::time::UNIX_EPOCH + Duration::from_secs(1 << 30));
    run_ok(Command::new("cmp").arg(&file).arg(&src));

    let names: Vec<String> = std::fs::read_dir(d.mnt().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["deb"]);
}

#[test]
fn dd_reads_image_with_and_without_direct_io() {
    if !fuse_usable() {
        return;
    }
    require(&["dd", "cmp"]);
    let d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, 16 * MIB, &[(MIB, MIB)], 8);
    add(&d, "img", &src);
    let file = d.mnt().join("images/img");
    for (flag, bs) in [("iflag=direct", "1M"), ("iflag=direct", "4k"), ("", "64k")] {
        let out = d.dir.path().join("copy.raw");
        let mut cmd = Command::new("dd");
        cmd.arg(format!("if={}", file.display()))
            .arg(format!("of={}", out.display()))
            .arg(format!("bs={bs}"));
        if !flag.is_empty() {
            cmd.arg(flag);
        }
        run_ok(&mut cmd);
        run_ok(Command::new("cmp").arg(&out).arg(&src));
    }
}

#[test]
fn image_file_refuses_writes_and_new_files() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, MIB, &[], 9);
    add(&d, "ro", &src);
    let file = d.mnt().join("images/ro");
    // Root passes the mode check; the export itself refuses.
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(&file)),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno_of(std::fs::File::create(d.mnt().join("images/new"))),
        Some(libc::EPERM)
    );
    assert_eq!(errno_of(std::fs::remove_file(&file)), Some(libc::EPERM));
}

#[test]
fn fuse_file_compares_equal_to_nbd_export() {
    if !fuse_usable() {
        return;
    }
    require(&["qemu-img"]);
    let d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, 20 * MIB + 512, &[(4 * MIB, 2 * MIB)], 10);
    add(&d, "same", &src);
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        d.mnt().join("images/same").to_str().unwrap(),
        &d.uri("images/same"),
    ]));
}

#[test]
fn images_appear_and_disappear_with_their_lifecycle() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, MIB, &[], 11);
    let file = d.mnt().join("images/life");
    assert!(!file.exists());
    add(&d, "life", &src);
    wait_exists(&file, true);
    d.cli_ok(&["image", "disable", "life"]);
    wait_exists(&file, false);
    d.cli_ok(&["image", "enable", "life"]);
    wait_exists(&file, true);
    d.cli_ok(&["image", "delete", "life"]);
    wait_exists(&file, false);
    let listed = std::fs::read_dir(d.mnt().join("images")).unwrap().count();
    assert_eq!(listed, 0);
}

#[test]
fn open_file_keeps_reading_after_its_image_is_disabled() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, 2 * MIB, &[], 12);
    add(&d, "held", &src);
    let mut f = std::fs::File::open(d.mnt().join("images/held")).unwrap();
    d.cli_ok(&["image", "disable", "held"]);
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, std::fs::read(&src).unwrap());
}

#[test]
fn stale_mount_of_a_killed_daemon_is_replaced_at_start() {
    if !fuse_usable() {
        return;
    }
    let mut d = Daemon::start();
    let src = d.dir.path().join("src.raw");
    write_image(&src, MIB, &[], 13);
    add(&d, "again", &src);
    // SAFETY: kill(2) on our own child; no memory is passed.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    d.stop();
    assert_eq!(
        errno_of(std::fs::metadata(d.mnt())),
        Some(libc::ENOTCONN),
        "a killed daemon leaves a dead mount"
    );

    d.restart();
    assert!(
        d.log().contains("replacing a stale FUSE mount"),
        "{}",
        d.log()
    );
    run_ok(
        Command::new("cmp")
            .arg(d.mnt().join("images/again"))
            .arg(&src),
    );

    d.stop();
    assert!(!is_mounted(&d.mnt()), "SIGTERM leaves no mount behind");
    assert!(std::fs::metadata(d.mnt()).unwrap().is_dir());
}

#[test]
fn fuse_mount_off_mounts_nothing() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start_with(&["--fuse-mount", "off"]);
    assert!(!is_mounted(&d.mnt()));
    assert!(d.log().contains("FUSE export is off"), "{}", d.log());
}

#[test]
fn configured_mount_point_that_is_a_file_is_a_start_up_error() {
    let dir = tempdir();
    let not_dir = dir.path().join("file");
    std::fs::write(&not_dir, b"x").unwrap();
    let out = Command::new(common::bin())
        .args(["serve", "--nbd-tcp", "off", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--fuse-mount")
        .arg(&not_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot start the FUSE export"), "{err}");
}

// ---- writable devices, in process ------------------------------------------------------

/// A registry of fixed devices.
struct TestRegistry(Mutex<BTreeMap<String, Arc<dyn BlockDevice>>>);

impl ExportRegistry for TestRegistry {
    fn list(&self) -> Vec<ExportListing> {
        self.0
            .lock()
            .keys()
            .map(|n| ExportListing {
                name: n.clone(),
                description: String::new(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Option<Export> {
        let device = self.0.lock().get(name)?.clone();
        Some(Export {
            name: name.to_string(),
            description: String::new(),
            device,
        })
    }
}

/// `volumes/vol`: an `OverlayVolume` of `size` bytes over random base bytes, mounted at
/// `mnt`, and served by the NBD server on `nbd.sock`.
struct Mounted {
    rt: tokio::runtime::Runtime,
    fuse: Option<FuseExport>,
    base: Vec<u8>,
    volume: Arc<OverlayVolume>,
    registry: Arc<TestRegistry>,
    nbd_sock: PathBuf,
    _stop_nbd: tokio::sync::watch::Sender<bool>,
    dir: tempfile::TempDir,
}

impl Mounted {
    fn new(size: u64) -> Mounted {
        let dir = tempdir();
        let mut base = vec![0u8; size as usize];
        Rng::new(size).fill(&mut base);
        let overlay = Overlay::create_dir(&dir.path().join("overlay"), size, size).unwrap();
        let volume = Arc::new(OverlayVolume::new(
            Arc::new(overlay),
            Arc::new(MemBase(base.clone())),
        ));
        let mut map: BTreeMap<String, Arc<dyn BlockDevice>> = BTreeMap::new();
        map.insert("volumes/vol".into(), volume.clone());
        let registry = Arc::new(TestRegistry(Mutex::new(map)));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mnt = dir.path().join("mnt");
        let fuse = FuseExport::mount(registry.clone(), rt.handle().clone(), &mnt, 4).unwrap();
        let nbd_sock = dir.path().join("nbd.sock");
        let (tx, rx) = tokio::sync::watch::channel(false);
        {
            let _g = rt.enter();
            let listener = tokio::net::UnixListener::bind(&nbd_sock).unwrap();
            let server = NbdServer::new(registry.clone() as Arc<dyn ExportRegistry>);
            rt.spawn(server.run_unix(listener, rx));
        }
        Mounted {
            rt,
            fuse: Some(fuse),
            base,
            volume,
            registry,
            nbd_sock,
            _stop_nbd: tx,
            dir,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("mnt/volumes/vol")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///volumes/vol?socket={}", self.nbd_sock.display())
    }

    /// Read the device directly (what any other front end sees).
    fn device_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.rt
            .block_on(self.volume.read(offset, &mut buf))
            .unwrap();
        buf
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(f) = self.fuse.take() {
            f.unmount().unwrap();
        }
    }
}

#[test]
fn volume_file_is_read_write_with_mode_0660_and_base_contents() {
    if !fuse_usable() {
        return;
    }
    let m = Mounted::new(8 * MIB);
    let meta = std::fs::metadata(m.file()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!(meta.len(), 8 * MIB);
    assert_eq!(std::fs::read(m.file()).unwrap(), m.base);
}

#[test]
fn writes_through_fuse_are_seen_by_the_device_and_back() {
    if !fuse_usable() {
        return;
    }
    let m = Mounted::new(8 * MIB);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    let data = vec![0xabu8; 300_000];
    f.write_all_at(&data, 12345).unwrap();
    f.sync_all().unwrap();
    assert_eq!(m.device_bytes(12345, data.len()), data);

    // A write by another front end shows through at once (no stale page cache).
    let other = vec![0x5au8; 4096];
    let w = m.volume.writable().unwrap();
    m.rt.block_on(w.write(MIB, &other, false)).unwrap();
    let mut got = vec![0u8; 4096];
    f.read_exact_at(&mut got, MIB).unwrap();
    assert_eq!(got, other);
}

#[test]
fn dd_writes_volume_with_and_without_direct_io() {
    if !fuse_usable() {
        return;
    }
    require(&["dd", "cmp"]);
    let m = Mounted::new(16 * MIB);
    let src = m.dir.path().join("src.raw");
    write_image(&src, 16 * MIB, &[(3 * MIB, MIB)], 21);
    // No conv=notrunc: O_TRUNC is ignored, as on a block device.
    run_ok(Command::new("dd").args([
        &format!("if={}", src.display()),
        &format!("of={}", m.file().display()),
        "bs=1M",
        "oflag=direct",
    ]));
    run_ok(Command::new("cmp").arg(m.file()).arg(&src));
    write_image(&src, 16 * MIB, &[], 22);
    run_ok(Command::new("dd").args([
        &format!("if={}", src.display()),
        &format!("of={}", m.file().display()),
        "bs=64k",
        "conv=notrunc,fsync",
    ]));
    let out = m.dir.path().join("back.raw");
    run_ok(Command::new("dd").args([
        &format!("if={}", m.file().display()),
        &format!("of={}", out.display()),
        "bs=1M",
        "iflag=direct",
    ]));
    run_ok(Command::new("cmp").arg(&out).arg(&src));
    assert_eq!(std::fs::metadata(m.file()).unwrap().len(), 16 * MIB);
}

#[test]
fn fio_verifies_volume_file_with_libaio_direct_and_psync() {
    if !fuse_usable() {
        return;
    }
    require(&["fio"]);
    let m = Mounted::new(32 * MIB);
    let file = m.file();
    for args in [
        &[
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
        ][..],
        &["--ioengine=psync", "--direct=0", "--rw=write", "--bs=1M"][..],
        &[
            "--ioengine=psync",
            "--direct=1",
            "--rw=randwrite",
            "--bs=64k",
            "--numjobs=1",
        ][..],
    ] {
        run_ok(
            Command::new("fio")
                .args([
                    "--name=verify",
                    &format!("--filename={}", file.display()),
                    "--size=32M",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                ])
                .args(args),
        );
    }
}

#[test]
fn fuse_and_nbd_see_the_same_volume_bytes() {
    if !fuse_usable() {
        return;
    }
    require(&["qemu-img", "fio"]);
    let m = Mounted::new(16 * MIB);
    run_ok(Command::new("fio").args([
        "--name=w",
        &format!("--filename={}", m.file().display()),
        "--size=16M",
        "--ioengine=psync",
        "--direct=1",
        "--rw=randwrite",
        "--bs=16k",
        "--io_size=4M",
    ]));
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        m.file().to_str().unwrap(),
        &m.uri(),
    ]));
}

#[test]
fn second_writer_of_a_volume_is_refused_with_ebusy() {
    if !fuse_usable() {
        return;
    }
    let m = Mounted::new(MIB);
    let first = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(m.file())),
        Some(libc::EBUSY)
    );
    // Readers are welcome meanwhile.
    let reader = std::fs::File::open(m.file()).unwrap();
    drop(first);
    let second = OpenOptions::new().read(true).write(true).open(m.file());
    assert!(second.is_ok(), "{second:?}");
    drop(reader);
}

#[test]
fn punch_hole_trims_and_zero_range_zeroes() {
    if !fuse_usable() {
        return;
    }
    require(&["fallocate"]);
    let m = Mounted::new(8 * MIB);
    let path = m.file();
    run_ok(
        Command::new("fallocate")
            .args(["-p", "-o", "1MiB", "-l", "1MiB"])
            .arg(&path),
    );
    run_ok(
        Command::new("fallocate")
            .args(["-z", "-o", "4MiB", "-l", "64KiB"])
            .arg(&path),
    );
    let got = std::fs::read(&path).unwrap();
    assert!(got[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(got[4 * MIB as usize..4 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(got[..MIB as usize], m.base[..MIB as usize]);
    assert_eq!(
        got[2 * MIB as usize..4 * MIB as usize],
        m.base[2 * MIB as usize..4 * MIB as usize]
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
}

#[test]
fn volume_size_is_fixed() {
    if !fuse_usable() {
        return;
    }
    let m = Mounted::new(MIB);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    assert_eq!(errno_of(f.set_len(2 * MIB)), Some(libc::EPERM));
    f.seek(SeekFrom::Start(MIB)).unwrap();
    assert_eq!(errno_of(f.write(b"past the end")), Some(libc::ENOSPC));
    // A write crossing the end stops there.
    assert_eq!(f.write_at(&[1u8; 8192], MIB - 4096).unwrap(), 4096);
    assert_eq!(std::fs::metadata(m.file()).unwrap().len(), MIB);
}

#[test]
fn o_direct_open_of_volume_reads_aligned_blocks() {
    if !fuse_usable() {
        return;
    }
    let m = Mounted::new(2 * MIB);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.file())
        .unwrap();
    let mut buf = vec![0u8; 65536];
    f.read_exact_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, m.base[65536..131072]);
}

#[test]
fn volume_removed_from_registry_disappears() {
    if !fuse_usable() {
        return;
    }
    let m = Mounted::new(MIB);
    assert!(m.file().exists());
    m.registry.0.lock().clear();
    wait_exists(&m.file(), false);
}

// ---- daemon volumes: `MOUNT/volumes/NAME` of a volume made with the CLI ------------------

/// A daemon with image `base` (random bytes of `size`, one zero MiB at 1 MiB) and volume
/// `vol` of it. Returns the daemon, the image's bytes and the volume's FUSE file.
fn daemon_volume(size: u64) -> (Daemon, Vec<u8>, PathBuf) {
    let d = Daemon::start();
    let src = d.dir.path().join("base.raw");
    write_image(&src, size, &[(MIB, MIB)], 31);
    add(&d, "base", &src);
    d.cli_ok(&["volume", "create", "vol", "--image", "base"]);
    let file = d.mnt().join("volumes/vol");
    wait_exists(&file, true);
    let bytes = std::fs::read(&src).unwrap();
    (d, bytes, file)
}

fn open_rw(path: &Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
}

fn qemu_img_compare(a: &str, b: &str) {
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
}

#[test]
fn fio_verifies_daemon_volume_file_with_libaio_direct() {
    if !fuse_usable() {
        return;
    }
    require(&["fio"]);
    let (d, base, file) = daemon_volume(32 * MIB);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 32 * MIB);
    assert_eq!(std::fs::read(&file).unwrap(), base);
    for args in [
        &["--rw=randwrite", "--bs=4k", "--iodepth=32"][..],
        &["--rw=write", "--bs=1M", "--iodepth=8"][..],
        &["--rw=randrw", "--bs=64k", "--iodepth=4"][..],
    ] {
        run_ok(
            Command::new("fio")
                .args([
                    "--name=verify",
                    &format!("--filename={}", file.display()),
                    "--size=32M",
                    "--ioengine=libaio",
                    "--direct=1",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                ])
                .args(args),
        );
    }
    drop(d);
}

#[test]
fn daemon_volume_fuse_file_and_nbd_export_see_each_others_writes() {
    if !fuse_usable() {
        return;
    }
    require(&["qemu-img", "qemu-io", "fio"]);
    let (d, _base, file) = daemon_volume(16 * MIB);
    let uri = d.uri("volumes/vol");
    // Writes through FUSE, read through NBD.
    run_ok(Command::new("fio").args([
        "--name=w",
        &format!("--filename={}", file.display()),
        "--size=16M",
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=8",
        "--rw=randwrite",
        "--bs=16k",
        "--io_size=4M",
    ]));
    qemu_img_compare(file.to_str().unwrap(), &uri);

    // Writes through NBD, read through FUSE (the file bypasses the page cache).
    let reader = std::fs::File::open(&file).unwrap();
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 3M 192k",
        "-c",
        "write -z 8M 64k",
        &uri,
    ]));
    let mut got = vec![0u8; 192 << 10];
    reader.read_exact_at(&mut got, 3 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a), "NBD write not seen");
    let mut got = vec![1u8; 64 << 10];
    reader.read_exact_at(&mut got, 8 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == 0), "NBD zeroing not seen");
    qemu_img_compare(file.to_str().unwrap(), &uri);
}

#[test]
fn fsynced_fuse_writes_survive_sigkill_of_the_daemon() {
    if !fuse_usable() {
        return;
    }
    require(&["qemu-img"]);
    let (mut d, base, file) = daemon_volume(8 * MIB);
    let mut data = vec![0u8; 300_000];
    Rng::new(41).fill(&mut data);
    let f = open_rw(&file);
    f.write_all_at(&data, 12345).unwrap();
    f.write_all_at(&data[..4096], 7 * MIB).unwrap();
    f.sync_all().unwrap();

    // No shutdown at all; the file stays open on the dead mount meanwhile, and the new
    // daemon starts at once (while the kernel still caches the dead mount's attributes).
    d.kill_and_restart();
    assert!(
        d.log().contains("replacing a stale FUSE mount"),
        "{}",
        d.log()
    );
    drop(f);
    wait_exists(&file, true);

    let mut want = base.clone();
    want[12345..12345 + data.len()].copy_from_slice(&data);
    want[7 * MIB as usize..7 * MIB as usize + 4096].copy_from_slice(&data[..4096]);
    assert!(std::fs::read(&file).unwrap() == want, "fsynced bytes lost");
    let out = d.dir.path().join("nbd.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &d.uri("volumes/vol"),
        out.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&out).unwrap() == want, "NBD view differs");
}

#[test]
fn punch_hole_in_daemon_volume_reads_zeros_not_the_image() {
    if !fuse_usable() {
        return;
    }
    require(&["fallocate"]);
    let (d, base, file) = daemon_volume(8 * MIB);
    // Over image bytes never written, and over bytes written through the volume.
    let f = open_rw(&file);
    f.write_all_at(&[0x77u8; 65536], 5 * MIB).unwrap();
    drop(f);
    for (off, len) in [("3MiB", "1MiB"), ("5MiB", "64KiB"), ("6MiB", "4KiB")] {
        run_ok(
            Command::new("fallocate")
                .args(["-p", "-o", off, "-l", len])
                .arg(&file),
        );
    }
    let got = std::fs::read(&file).unwrap();
    let m = MIB as usize;
    assert!(got[3 * m..4 * m].iter().all(|&b| b == 0));
    assert!(got[5 * m..5 * m + 65536].iter().all(|&b| b == 0));
    assert!(got[6 * m..6 * m + 4096].iter().all(|&b| b == 0));
    assert_eq!(got[..3 * m], base[..3 * m]);
    assert_eq!(got[4 * m..5 * m], base[4 * m..5 * m]);
    assert_eq!(got[6 * m + 4096..], base[6 * m + 4096..]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 8 * MIB);
    // The image itself is untouched.
    assert!(std::fs::read(d.mnt().join("images/base")).unwrap() == base);
}

#[test]
fn second_writer_of_a_daemon_volume_gets_ebusy() {
    if !fuse_usable() {
        return;
    }
    let (_d, _base, file) = daemon_volume(MIB);
    let first = open_rw(&file);
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(&file)),
        Some(libc::EBUSY)
    );
    let reader = std::fs::File::open(&file).unwrap();
    drop(first);
    let again = OpenOptions::new().read(true).write(true).open(&file);
    assert!(again.is_ok(), "{again:?}");
    drop(reader);
}

#[test]
fn vm_boots_from_a_daemon_volume_fuse_file() {
    if !fuse_usable() {
        return;
    }
    let d = Daemon::start();
    let mnt = d.mnt();
    common::vm::boot_twice_and_check_isolation(&d, |volume| {
        let file = mnt.join("volumes").join(volume);
        wait_exists(&file, true);
        format!("file={},format=raw,if=virtio,cache=none", file.display())
    });
}
