//! End to end: images added through the CLI, served by the daemon, read by real NBD clients
//! (nbdinfo, nbdcopy, qemu-img, fio) and by a hand-written raw client for malformed input.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{have, run_ok, write_image, Daemon};

const MIB: u64 = 1 << 20;

fn require(tools: &[&str]) {
    for t in tools {
        assert!(
            have(t),
            "{t} is not installed: run the suite with scripts/test.sh, which installs it"
        );
    }
}

fn add(d: &Daemon, name: &str, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["image", "add", name, "--file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    d.cli_ok(&args);
    d.show(name)
}

fn count_files(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += count_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

#[test]
fn nbdinfo_lists_and_describes_active_images() {
    require(&["nbdinfo"]);
    let d = Daemon::start();
    let f = d.dir.path().join("a.raw");
    write_image(&f, 3 * MIB + 512, &[], 1);
    add(&d, "alpha", &f, &[]);
    add(&d, "beta", &f, &["--description", "the second one"]);

    let list = run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", d.nbd_sock().display()),
    ]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["images/alpha", "images/beta"]);

    let info = run_ok(Command::new("nbdinfo").args(["--json", &d.uri("images/alpha")]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(3 * MIB + 512));
    assert_eq!(e["is_read_only"].as_bool(), Some(true));
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true));
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB));
}

#[test]
fn qemu_img_compare_and_nbdcopy_equal_the_source() {
    require(&["qemu-img", "nbdcopy"]);
    let d = Daemon::start();
    let f = d.dir.path().join("src.raw");
    // Not a multiple of any chunk size; zero regions aligned and unaligned.
    let size = 20 * MIB + 12345;
    write_image(&f, size, &[(2 * MIB, 3 * MIB), (7 * MIB + 100, 50_000)], 2);
    for (name, chunk) in [("small-chunks", "64K"), ("big-chunks", "4M")] {
        add(&d, name, &f, &["--chunk-size", chunk]);
        let uri = d.uri(&format!("images/{name}"));
        run_ok(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&f)
                .arg(&uri),
        );
        let out = d.dir.path().join(format!("{name}.copy"));
        run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&f).unwrap(),
            "{name}: nbdcopy differs"
        );
    }
}

#[test]
fn qemu_img_map_shows_the_holes() {
    require(&["qemu-img"]);
    let d = Daemon::start();
    let f = d.dir.path().join("holes.raw");
    // 64 KiB chunks: [1 MiB, 3 MiB) and the last 1 MiB are holes; a partly zero chunk is data.
    write_image(
        &f,
        8 * MIB,
        &[(MIB, 2 * MIB), (7 * MIB, MIB), (5 * MIB, 1000)],
        3,
    );
    add(&d, "holes", &f, &["--chunk-size", "64K"]);
    let map = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &d.uri("images/holes"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut holes = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"].as_bool() == Some(false) {
            assert_eq!(e["zero"].as_bool(), Some(true), "{e}");
            holes.push((e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()));
        }
    }
    assert_eq!(holes, vec![(MIB, 2 * MIB), (7 * MIB, MIB)], "map: {map}");
}

#[test]
fn fio_verified_reads_over_nbd() {
    require(&["fio"]);
    let d = Daemon::start();
    let f = d.dir.path().join("fio.raw");
    // fio writes blocks carrying headers and crc32c; reads through imgcache verify them.
    run_ok(Command::new("fio").args([
        "--name=gen",
        &format!("--filename={}", f.display()),
        "--size=48M",
        "--rw=write",
        "--bs=64k",
        "--verify=crc32c",
        "--do_verify=0",
        "--ioengine=psync",
        "--output=/dev/null",
    ]));
    add(&d, "fio", &f, &[]);
    for (rw, bs, depth) in [("read", "64k", "8"), ("randread", "64k", "32")] {
        let out = run_ok(Command::new("fio").args([
            "--name=gen",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("images/fio")),
            "--size=48M",
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--verify=crc32c",
            "--verify_only",
        ]));
        assert!(out.contains("err= 0"), "fio {rw}: {out}");
    }
}

/// A minimal hand-written NBD client for protocol-level checks.
struct RawClient(UnixStream);

impl RawClient {
    const OPTS_MAGIC: u64 = 0x4948_4156_454F_5054; // "IHAVEOPT"

    fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient(s)
    }

    fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }

    /// Greeting + NBD_OPT_EXPORT_NAME with NO_ZEROES; returns (size, transmission flags).
    fn open(sock: &Path, export: &str) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect(sock);
        let g = c.read_exact(18).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(g[8..16].try_into().unwrap()),
            Self::OPTS_MAGIC
        );
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags & 3, 3, "FIXED_NEWSTYLE and NO_ZEROES");
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = Self::OPTS_MAGIC.to_be_bytes().to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        c.0.write_all(&opt).unwrap();
        let r = c.read_exact(10).unwrap();
        let size = u64::from_be_bytes(r[..8].try_into().unwrap());
        let tflags = u16::from_be_bytes([r[8], r[9]]);
        (c, size, tflags)
    }

    fn request(&mut self, typ: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.0.write_all(&r).unwrap();
    }

    /// A simple reply: (error, handle).
    fn simple_reply(&mut self) -> (u32, u64) {
        let r = self.read_exact(16).unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn malformed_handshakes_and_requests_leave_other_clients_served() {
    require(&["qemu-img"]);
    let d = Daemon::start();
    let f = d.dir.path().join("m.raw");
    write_image(&f, 4 * MIB, &[], 4);
    add(&d, "m", &f, &[]);
    let sock = d.nbd_sock();

    // An idle client that never speaks, and one sending garbage instead of client flags.
    let _idle = RawClient::connect(&sock);
    let mut garbage = RawClient::connect(&sock);
    garbage.read_exact(18).unwrap();
    garbage.0.write_all(&[0xff; 64]).unwrap();
    assert!(
        garbage.closed(),
        "garbage client flags must close the connection"
    );

    // A valid client sending an oversized option: the server hangs up on it.
    let mut big = RawClient::connect(&sock);
    big.read_exact(18).unwrap();
    big.0.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = RawClient::OPTS_MAGIC.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    big.0.write_all(&opt).unwrap();
    assert!(
        big.closed(),
        "an absurd option length must close the connection"
    );

    // Malformed requests on an open export.
    let (mut c, size, tflags) = RawClient::open(&sock, "images/m");
    assert_eq!(size, 4 * MIB);
    assert_ne!(tflags & 2, 0, "READ_ONLY flag");
    c.request(0, 1, size - 512, 1024, &[]); // read past the end
    assert_eq!(c.simple_reply(), (libc::EINVAL as u32, 1));
    c.request(1, 2, 0, 4, b"abcd"); // write to a read-only export
    assert_eq!(c.simple_reply(), (libc::EPERM as u32, 2));
    c.request(0, 3, 0, 0, &[]); // zero-length read
    assert_eq!(c.simple_reply().1, 3);
    c.request(0x77, 4, 0, 512, &[]); // unknown command
    assert_eq!(c.simple_reply(), (libc::EINVAL as u32, 4));
    c.request(0, 5, 4096, 4096, &[]); // still serving this client
    assert_eq!(c.simple_reply(), (0, 5));
    let data = c.read_exact(4096).unwrap();
    assert_eq!(data, std::fs::read(&f).unwrap()[4096..8192]);
    c.0.write_all(&[0xde; 28]).unwrap(); // bad request magic: disconnect
    assert!(c.closed(), "a bad request magic must close the connection");

    // Meanwhile the others are still served.
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&f)
            .arg(d.uri("images/m")),
    );
}

#[test]
fn disabled_and_deleted_images_are_not_exported() {
    require(&["nbdinfo"]);
    let d = Daemon::start();
    let f = d.dir.path().join("l.raw");
    write_image(&f, MIB, &[], 5);
    add(&d, "life", &f, &[]);
    let exported = |d: &Daemon| {
        Command::new("nbdinfo")
            .arg("--size")
            .arg(d.uri("images/life"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(exported(&d));
    d.cli_ok(&["image", "disable", "life"]);
    assert!(!exported(&d), "disabled image still exported");
    d.cli_ok(&["image", "enable", "life"]);
    assert!(exported(&d));
    d.cli_ok(&["image", "delete", "life"]);
    assert!(!exported(&d), "deleted image still exported");
    assert!(
        !d.cli_ok(&["image", "list"]).contains("life"),
        "deleted image listed without --all"
    );
    assert!(d.cli_ok(&["image", "list", "--all"]).contains("life"));
    d.cli_ok(&["image", "recover", "life"]);
    assert!(exported(&d));
}

#[test]
fn failed_add_leaves_nothing_and_expunge_keeps_shared_chunks() {
    require(&["qemu-img"]);
    let d = Daemon::start();
    let chunks = d.state.join("store/chunks");
    let a = d.dir.path().join("a.raw");
    write_image(&a, 4 * MIB, &[], 6);

    // A checksum mismatch names both values and leaves no row and no chunk.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = d.cli_err(&[
        "image",
        "add",
        "bad",
        "--file",
        a.to_str().unwrap(),
        "--checksum",
        &wrong,
    ]);
    assert!(err.contains(&"0".repeat(64)), "expected value shown: {err}");
    assert!(err.lines().count() <= 3, "a short error, got: {err}");
    assert!(!d.cli_ok(&["image", "list", "--all"]).contains("bad"));
    assert_eq!(count_files(&chunks), 0, "orphan chunks after a failed add");

    // B shares three of A's four chunks.
    let b = d.dir.path().join("b.raw");
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[3 * MIB as usize..].fill(0x5a);
    std::fs::write(&b, &bytes).unwrap();
    let ia = add(&d, "a", &a, &[]);
    let sha = ia["sha256"].as_str().unwrap().to_string();
    add(&d, "b", &b, &[]);
    assert_eq!(count_files(&chunks), 5, "shared chunks are stored once");

    // A correct checksum is accepted.
    d.cli_ok(&[
        "image",
        "add",
        "a2",
        "--file",
        a.to_str().unwrap(),
        "--checksum",
        &format!("sha256:{sha}"),
    ]);
    d.cli_ok(&["image", "delete", "a2"]);
    d.cli_ok(&["image", "expunge", "a2"]);

    d.cli_ok(&["image", "set", "a", "--protected"]);
    let err = d.cli_err(&["image", "delete", "a"]);
    assert!(err.contains("protected"), "{err}");
    d.cli_ok(&["image", "set", "a", "--unprotected"]);
    d.cli_ok(&["image", "delete", "a"]);
    d.cli_ok(&["image", "expunge", "a"]);
    assert_eq!(count_files(&chunks), 4, "only a's unshared chunk is gone");
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&b)
            .arg(d.uri("images/b")),
    );
}

#[test]
fn images_survive_a_restart() {
    require(&["qemu-img"]);
    let mut d = Daemon::start();
    let f = d.dir.path().join("p.raw");
    write_image(&f, 5 * MIB + 7, &[(MIB, MIB)], 7);
    let before = add(&d, "persist", &f, &[]);
    d.restart();
    assert_eq!(d.show("persist"), before);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&f)
            .arg(d.uri("images/persist")),
    );
}
