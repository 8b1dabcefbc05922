//! End to end: volumes over images that live only in a remote store (our HTTP range server,
//! moto for S3), through the real daemon and CLI, written and read by real NBD clients
//! (qemu-io, qemu-img, nbdcopy).
//!
//! - A flattened volume (and its snapshots) reads right with the store gone, the daemon
//!   restarted and the image expunged.

mod common;
mod common_remote;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{have, run_ok, write_image, Daemon};
use common_remote::moto::Moto;
use common_remote::web::Web;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn require(tools: &[&str]) {
    for t in tools {
        assert!(
            have(t),
            "{t} is not installed: run the suite with scripts/test.sh, which installs it"
        );
    }
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    serde_json::from_str(&d.cli_ok(args)).unwrap()
}

fn volume_json(d: &Daemon, name: &str) -> Value {
    json(d, &["volume", "show", name, "--json"])
}

fn qemu_io(d: &Daemon, export: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &d.uri(export)]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

/// `qemu-img compare` of an export with the bytes `want` (written to a file first).
fn assert_export_is(d: &Daemon, export: &str, want: &[u8]) {
    let file = d.dir.path().join("expected.raw");
    std::fs::write(&file, want).unwrap();
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &d.uri(export),
        file.to_str().unwrap(),
    ]));
}

/// Apply qemu-io's `write -P BYTE OFF LEN` (or zeros) to the model.
fn fill(want: &mut [u8], off: u64, len: u64, byte: u8) {
    want[off as usize..(off + len) as usize].fill(byte);
}

fn s3_config(moto: &Moto, bucket: &str) -> String {
    // No retries and a short timeout: whatever still touches the store fails fast.
    format!(
        "[stores.s3]\ntype = \"s3\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\n\
         access-key-id = \"test\"\nsecret-access-key = \"test\"\nallow-http = true\n\
         retries = 0\ntimeout = \"2s\"\n",
        moto.endpoint()
    )
}

const CACHE_CONFIG: &str =
    "[cache]\nfetch-timeout = \"2s\"\nread-timeout = \"4s\"\nreadahead-chunks = 0\n";

/// The base image's bytes: 8 MiB + 12 KiB (not a whole number of chunks) with a zero region.
fn base_bytes(path: &Path) -> Vec<u8> {
    write_image(path, 8 * MIB + 12 * 1024, &[(2 * MIB, MIB)], 21);
    std::fs::read(path).unwrap()
}

/// Wait until the flatten of `vol` stopped; returns `volume show --json`.
fn wait_flattened(d: &Daemon, vol: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = volume_json(d, vol);
        if v["flatten"]["running"] == false {
            return v;
        }
        assert!(Instant::now() < deadline, "flatten still running: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Volume `v` (12 MiB) over image `base` (remote, bytes `base`), written before and after
/// snapshot `s1`, flattened; then `stop_store` stops the store, the daemon restarts, and the
/// image is expunged (its cached chunks go with it). The volume, a clone of `s1` and the
/// volume reverted to `s1` must all read right.
fn flatten_then_lose_the_store(
    d: &mut Daemon,
    base: &[u8],
    base_store: &str,
    stop_store: impl FnOnce(),
) {
    let size = 12 * MIB;
    d.cli_ok(&["volume", "create", "v", "--image", "base", "--size", "12M"]);
    let mut want = base.to_vec();
    want.resize(size as usize, 0);
    qemu_io(
        d,
        "volumes/v",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1000 3000",
            "write -P 0x33 5M 4k",
        ],
    );
    fill(&mut want, 0, 65536, 0x11);
    fill(&mut want, 1000, 3000, 0x22);
    fill(&mut want, 5 * MIB, 4096, 0x33);
    d.cli_ok(&["volume", "snapshot", "v", "s1"]);
    let want_s1 = want.clone();
    qemu_io(
        d,
        "volumes/v",
        &[
            "write -P 0x44 4k 4k",
            "write -z 6M 128k",
            "write -P 0x55 10M 64k",
            "discard 3M 64k",
            "write -P 0x66 8200k 20k",
        ],
    );
    fill(&mut want, 4096, 4096, 0x44);
    fill(&mut want, 6 * MIB, 128 * 1024, 0);
    fill(&mut want, 10 * MIB, 65536, 0x55);
    fill(&mut want, 3 * MIB, 65536, 0);
    fill(&mut want, 8200 * 1024, 20 * 1024, 0x66);
    let before = volume_json(d, "v");
    assert_eq!(before["base_store"], base_store, "{before}");

    d.cli_ok(&["volume", "flatten", "v"]);
    let v = wait_flattened(d, "v");

    assert_eq!(v["flattened"], true, "{v}");
    assert_eq!(v["flatten"]["error"], Value::Null, "{v}");
    assert_eq!(v["base_store"], Value::Null, "{v}");
    stop_store();
    d.restart();
    d.cli_ok(&["image", "delete", "base"]);
    d.cli_ok(&["image", "expunge", "base"]);

    let text = d.cli_ok(&["volume", "show", "v"]);
    assert!(
        text.contains("needs neither the image nor a store"),
        "{text}"
    );
    let v = volume_json(d, "v");
    assert_eq!(v["flattened"], true, "{v}");
    assert_eq!(v["image_status"], "expunged", "{v}");
    assert_export_is(d, "volumes/v", &want);
    d.cli_ok(&["volume", "create", "c", "--snapshot", "v@s1"]);
    assert_export_is(d, "volumes/c", &want_s1);
    d.cli_ok(&["volume", "revert", "v", "s1"]);
    assert_export_is(d, "volumes/v", &want_s1);
}

#[test]
fn flattened_volume_of_an_http_object_reads_right_with_the_server_gone() {
    require(&["qemu-io", "qemu-img"]);
    let mut d = Daemon::start_with_config(CACHE_CONFIG);
    let root = d.dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    let base = base_bytes(&root.join("disk.raw"));
    let mut web = Web::start(&root);
    let url = format!("{}/disk.raw", web.url);
    d.cli_ok(&[
        "image",
        "add",
        "base",
        "--url",
        &url,
        "--chunk-size",
        "256K",
    ]);

    flatten_then_lose_the_store(&mut d, &base, "url", || web.kill());
}

#[test]
fn flattened_volume_of_an_s3_image_reads_right_with_moto_gone() {
    require(&["qemu-io", "qemu-img"]);
    let mut moto = Some(Moto::start());
    moto.as_ref().unwrap().create_bucket("images");
    let cfg = s3_config(moto.as_ref().unwrap(), "images") + CACHE_CONFIG;
    let mut d = Daemon::start_with_config(&cfg);
    let f = d.dir.path().join("disk.raw");
    let base = base_bytes(&f);
    // The image lives only in S3: pushed, then registered there, the local copy expunged.
    d.cli_ok(&[
        "image",
        "add",
        "seed",
        "--file",
        f.to_str().unwrap(),
        "--chunk-size",
        "256K",
    ]);
    d.cli_ok(&["image", "push", "seed", "--store", "s3"]);
    let manifest = d.show("seed")["manifest_key"].as_str().unwrap().to_string();
    d.cli_ok(&["image", "delete", "seed"]);
    d.cli_ok(&["image", "expunge", "seed"]);
    d.cli_ok(&[
        "image",
        "add",
        "base",
        "--store",
        "s3",
        "--manifest",
        &manifest,
    ]);

    flatten_then_lose_the_store(&mut d, &base, "s3", || drop(moto.take()));
}
