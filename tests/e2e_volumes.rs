//! End to end: copy-on-write volumes created through the CLI, exported read-write by the
//! daemon as `volumes/NAME`, written and read by real NBD clients (qemu-io, qemu-img,
//! nbdinfo, fio). The image's bytes never change.

mod common;

use std::path::Path;
use std::process::Command;

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

fn add(d: &Daemon, name: &str, file: &Path) {
    d.cli_ok(&["image", "add", name, "--file", file.to_str().unwrap()]);
}

fn qemu_io(d: &Daemon, export: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &d.uri(export)]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

fn read_export(d: &Daemon, export: &str, out: &Path) -> Vec<u8> {
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &d.uri(export),
        out.to_str().unwrap(),
    ]));
    std::fs::read(out).unwrap()
}

fn volume_json(d: &Daemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&d.cli_ok(&["volume", "show", name, "--json"])).unwrap()
}

/// An image of 8 MiB + its bytes, added as `base`.
fn setup(d: &Daemon) -> (std::path::PathBuf, Vec<u8>) {
    let f = d.dir.path().join("base.raw");
    write_image(&f, 8 * MIB, &[(2 * MIB, MIB)], 7);
    add(d, "base", &f);
    let bytes = std::fs::read(&f).unwrap();
    (f, bytes)
}

#[test]
fn volume_create_defaults_to_image_size_and_refuses_smaller() {
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["image", "set", "base", "--min-disk", "16M"]);

    let err = d.cli_err(&["volume", "create", "v", "--image", "base", "--size", "4M"]);
    assert!(err.contains("smaller than image"), "{err}");
    let err = d.cli_err(&["volume", "create", "v", "--image", "base", "--size", "8M"]);
    assert!(err.contains("minimum disk size"), "{err}");
    let err = d.cli_err(&["volume", "create", "v", "--image", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = d.cli_err(&["volume", "create", "a@b", "--image", "base"]);
    assert!(err.contains("not allowed"), "{err}");

    d.cli_ok(&["image", "set", "base", "--min-disk", "0"]);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    let v = volume_json(&d, "v");
    assert_eq!(v["size"].as_u64(), Some(8 * MIB));
    assert_eq!(v["allocated_bytes"].as_u64(), Some(0));
    let err = d.cli_err(&["volume", "create", "v", "--image", "base"]);
    assert!(err.contains("exists already"), "{err}");
    let list = d.cli_ok(&["volume", "list"]);
    assert!(list.lines().nth(1).unwrap().starts_with("v "), "{list}");
}

#[test]
fn qemu_io_writes_read_back_and_the_image_stays_untouched() {
    require(&["qemu-io", "qemu-img", "nbdinfo"]);
    let d = Daemon::start();
    let (f, base) = setup(&d);
    d.cli_ok(&["volume", "create", "vm1", "--image", "base"]);

    let info = run_ok(Command::new("nbdinfo").args(["--json", &d.uri("volumes/vm1")]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"].as_bool(), Some(false));
    assert_eq!(e["can_flush"].as_bool(), Some(true));
    assert_eq!(e["can_fua"].as_bool(), Some(true));
    assert_eq!(e["can_trim"].as_bool(), Some(true));
    assert_eq!(e["can_zero"].as_bool(), Some(true));
    assert_eq!(e["can_fast_zero"].as_bool(), Some(true));
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true));

    qemu_io(
        &d,
        "volumes/vm1",
        &[
            "write -P 0xab 4096 65536",
            "write -P 0xcd -f 1000 3000",
            "write -z 1M 64k",
            "discard 3M 128k",
            "write -z -u 5M 4096",
            "flush",
            "read -P 0xab 8192 4096",
            "read -P 0xcd 1000 3000",
            "read -P 0 1M 64k",
            "read -P 0 3M 128k",
        ],
    );

    let mut want = base.clone();
    want[4096..4096 + 65536].fill(0xab);
    want[1000..4000].fill(0xcd);
    want[MIB as usize..(MIB + 65536) as usize].fill(0);
    want[3 * MIB as usize..(3 * MIB + 131072) as usize].fill(0);
    want[5 * MIB as usize..(5 * MIB + 4096) as usize].fill(0);
    let got = read_export(&d, "volumes/vm1", &d.dir.path().join("out.raw"));
    assert!(
        got == want,
        "volume content differs from the expected writes"
    );
    let img = read_export(&d, "images/base", &d.dir.path().join("img.raw"));
    assert!(img == base, "the image changed");
    assert_eq!(std::fs::read(&f).unwrap(), base);

    // qemu-img compare: volume vs a file with the same content.
    let expect = d.dir.path().join("expect.raw");
    std::fs::write(&expect, &want).unwrap();
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &d.uri("volumes/vm1"),
        expect.to_str().unwrap(),
    ]));

    // The volume's data survives a restart.
    let mut d = d;
    d.restart();
    let got = read_export(&d, "volumes/vm1", &d.dir.path().join("out2.raw"));
    assert!(got == want, "volume content lost across a restart");
}

#[test]
fn two_volumes_of_one_image_are_independent() {
    require(&["qemu-io", "qemu-img"]);
    let d = Daemon::start();
    let (_f, base) = setup(&d);
    d.cli_ok(&["volume", "create", "a", "--image", "base"]);
    d.cli_ok(&["volume", "create", "b", "--image", "base", "--size", "12M"]);

    qemu_io(&d, "volumes/a", &["write -P 0x5a 0 1M"]);
    qemu_io(
        &d,
        "volumes/b",
        &["read -P 0 8M 4M", "write -P 0x66 11M 1M"],
    );

    let b = read_export(&d, "volumes/b", &d.dir.path().join("b.raw"));
    assert_eq!(b.len() as u64, 12 * MIB);
    assert!(b[..8 * MIB as usize] == base[..], "volume b sees a's write");
    assert!(b[11 * MIB as usize..].iter().all(|&x| x == 0x66));
}

#[test]
fn qemu_img_convert_into_a_volume_and_block_status() {
    require(&["qemu-img", "nbdinfo"]);
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["volume", "create", "dst", "--image", "base"]);
    let src = d.dir.path().join("src.raw");
    write_image(&src, 8 * MIB, &[(4 * MIB, 4 * MIB)], 99);

    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &d.uri("volumes/dst"),
    ]));

    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &d.uri("volumes/dst"),
    ]));
    let map =
        run_ok(Command::new("nbdinfo").args(["--map=imgcache:residency", &d.uri("volumes/dst")]));
    // Written data is the volume's own (bit 1).
    assert!(map.contains("  2"), "residency map: {map}");
}

#[test]
fn fio_verified_writes_on_a_volume() {
    require(&["fio"]);
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["volume", "create", "fio", "--image", "base"]);
    let out = run_ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("volumes/fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=8M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]));
    assert!(out.contains("err= 0"), "fio: {out}");
}

#[test]
fn snapshots_revert_and_clone() {
    require(&["qemu-io"]);
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    qemu_io(&d, "volumes/v", &["write -P 1 0 64k"]);
    d.cli_ok(&["volume", "snapshot", "v", "s1"]);
    qemu_io(&d, "volumes/v", &["write -P 2 0 64k"]);
    let err = d.cli_err(&["volume", "snapshot", "v", "s1"]);
    assert!(err.contains("exists already"), "{err}");
    let snaps = d.cli_ok(&["volume", "snapshots", "v"]);
    assert!(snaps.contains("s1"), "{snaps}");

    d.cli_ok(&["volume", "create", "c", "--snapshot", "v@s1"]);
    d.cli_ok(&["volume", "revert", "v", "s1"]);

    qemu_io(&d, "volumes/v", &["read -P 1 0 64k"]);
    qemu_io(&d, "volumes/c", &["read -P 1 0 64k", "write -P 3 0 4k"]);
    qemu_io(&d, "volumes/v", &["read -P 1 0 64k"]);
    let err = d.cli_err(&["volume", "revert", "v", "nope"]);
    assert!(err.contains("not found"), "{err}");
    d.cli_ok(&["volume", "delete-snapshot", "v", "s1"]);
    assert!(!d.cli_ok(&["volume", "snapshots", "v"]).contains("s1"));
}

#[test]
fn resize_grows_with_zero_tail_and_refuses_shrink() {
    require(&["qemu-io", "nbdinfo"]);
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    let err = d.cli_err(&["volume", "resize", "v", "4M"]);
    assert!(err.contains("only grow"), "{err}");

    d.cli_ok(&["volume", "resize", "v", "16M"]);

    let info = run_ok(Command::new("nbdinfo").args(["--size", &d.uri("volumes/v")]));
    assert_eq!(info.trim(), (16 * MIB).to_string());
    qemu_io(&d, "volumes/v", &["read -P 0 8M 8M"]);
}

#[test]
fn image_delete_is_refused_while_volumes_use_it_and_force_hides_it() {
    require(&["qemu-io"]);
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["volume", "create", "v1", "--image", "base"]);
    d.cli_ok(&["volume", "create", "v2", "--image", "base"]);

    let err = d.cli_err(&["image", "delete", "base"]);
    assert!(err.contains("v1, v2"), "{err}");
    d.cli_ok(&["image", "delete", "base", "--force"]);

    let err = d.cli_err(&["volume", "create", "v3", "--image", "base"]);
    assert!(err.contains("deleted"), "{err}");
    let err = d.cli_err(&["image", "expunge", "base"]);
    assert!(err.contains("v1, v2"), "{err}");
    qemu_io(&d, "volumes/v1", &["write -P 9 0 4k", "read -P 9 0 4k"]);
    assert_eq!(volume_json(&d, "v1")["image_status"], "deleted");
}

#[test]
fn flattened_volume_reads_right_without_its_image() {
    require(&["qemu-io", "qemu-img"]);
    let d = Daemon::start();
    let (_f, base) = setup(&d);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    qemu_io(&d, "volumes/v", &["write -P 0x42 0 4k"]);

    d.cli_ok(&["volume", "flatten", "v", "--wait"]);
    let v = volume_json(&d, "v");
    assert_eq!(v["flattened"].as_bool(), Some(true));
    d.cli_ok(&["image", "delete", "base"]);
    d.cli_ok(&["image", "expunge", "base"]);

    let mut want = base.clone();
    want[..4096].fill(0x42);
    let got = read_export(&d, "volumes/v", &d.dir.path().join("flat.raw"));
    assert!(got == want, "flattened volume differs");
    let mut d = d;
    d.restart();
    let got = read_export(&d, "volumes/v", &d.dir.path().join("flat2.raw"));
    assert!(got == want, "flattened volume differs after a restart");
}

#[test]
fn deleting_a_volume_frees_its_name_and_overlay() {
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    let id = volume_json(&d, "v")["id"].as_str().unwrap().to_string();
    assert!(d.state.join("volumes").join(&id).is_dir());

    d.cli_ok(&["volume", "delete", "v"]);

    assert!(!d.state.join("volumes").join(&id).exists());
    let err = d.cli_err(&["volume", "show", "v"]);
    assert!(err.contains("not found"), "{err}");
    d.cli_ok(&["image", "delete", "base"]);
}
