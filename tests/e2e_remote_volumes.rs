//! End to end: volumes over images that live only in a remote store (our HTTP range server,
//! moto for S3), through the real daemon and CLI, written and read by real NBD clients
//! (qemu-io, qemu-img, nbdcopy).
//!
//! - A flattened volume (and its snapshots) reads right with the store gone, the daemon
//!   restarted and the image expunged.
//! - `image create --from-volume` over an image in S3 makes a native image in S3 that shares
//!   the base's chunks there (uploading only new ones) and reads like any remote image, here
//!   and on a second daemon; a failed creation, a client that goes away and a daemon killed
//!   mid-way leave no row and no manifest, and a later attempt reuses the chunks uploaded.
//! - A raw-object base cannot share chunks: the image stays local and the report says why.

mod common;
mod common_remote;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{have, run_ok, write_image, Daemon};
use common_remote::moto::Moto;
use common_remote::range_server::RangeServerConfig;
use common_remote::web::Web;
use imgcache::store::spec::{open_store, StoreSpec};
use imgcache::store::Store;
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
    format!(
        "[stores.s3]\ntype = \"s3\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\n\
         access-key-id = \"test\"\nsecret-access-key = \"test\"\nallow-http = true\n",
        moto.endpoint()
    )
}

/// One chunk fetch at a time (no read-ahead), so a slow server makes a slow, steady import.
const CACHE_CONFIG: &str = "[cache]\nreadahead-chunks = 0\n";

/// The base image's bytes: 8 MiB + 12 KiB (not a whole number of chunks) with a zero region.
/// Push local image `seed` to the `s3` store, expunge the local copy, and register the
/// pushed manifest as image `name`, which then lives only in S3.
fn move_to_s3(d: &Daemon, seed: &str, name: &str) {
    d.cli_ok(&["image", "push", seed, "--store", "s3"]);
    let manifest = d.show(seed)["manifest_key"].as_str().unwrap().to_string();
    d.cli_ok(&["image", "delete", seed]);
    d.cli_ok(&["image", "expunge", seed]);
    d.cli_ok(&[
        "image",
        "add",
        name,
        "--store",
        "s3",
        "--manifest",
        &manifest,
    ]);
}

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
/// image is expunged (its cached chunks go with it). The volume, a clone of `s1`, an image
/// made from `s1` and the volume reverted to `s1` must all read right.
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
    let out = d.cli_ok(&["image", "create", "img-s1", "--from-volume", "v@s1"]);
    assert!(out.contains("store:  local"), "{out}");
    assert_export_is(d, "images/img-s1", &want_s1);
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
    move_to_s3(&d, "seed", "base");

    flatten_then_lose_the_store(&mut d, &base, "s3", || drop(moto.take()));
}

// ---- images from volumes over remote images ----

/// The test's own client of the S3 bucket the daemon uses (to look at what it holds).
struct Bucket {
    rt: tokio::runtime::Runtime,
    store: std::sync::Arc<dyn Store>,
}

impl Bucket {
    fn open(moto: &Moto, bucket: &str) -> Bucket {
        let cfg = s3_config(moto, bucket);
        let spec: StoreSpec = toml::from_str(cfg.split_once('\n').unwrap().1).unwrap();
        Bucket {
            rt: tokio::runtime::Runtime::new().unwrap(),
            store: open_store("s3", &spec).unwrap(),
        }
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.rt.block_on(self.store.list(prefix)).unwrap()
    }

    fn has(&self, key: &str) -> bool {
        self.rt.block_on(self.store.head(key)).unwrap().is_some()
    }
}

/// Field `key` of a `key: value` line of the CLI's report.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
        .trim()
        .to_string()
}

fn digest(tool: &str, file: &Path) -> String {
    let out = run_ok(Command::new(tool).arg(file));
    out.split_whitespace().next().unwrap().to_string()
}

fn assert_same(d: &Daemon, a: &str, b: &str) {
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &d.uri(a),
        &d.uri(b),
    ]));
}

fn image_names(d: &Daemon) -> Vec<String> {
    let rows = json(d, &["image", "list", "--all", "--json"]);
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn image_from_a_volume_of_an_s3_image_is_made_in_s3_sharing_the_base_chunks() {
    require(&["qemu-io", "qemu-img", "nbdcopy", "md5sum", "sha256sum"]);
    let mut moto = Some(Moto::start());
    moto.as_ref().unwrap().create_bucket("images");
    let bucket = Bucket::open(moto.as_ref().unwrap(), "images");
    let cfg = s3_config(moto.as_ref().unwrap(), "images") + CACHE_CONFIG;
    let d = Daemon::start_with_config(&cfg);
    // Base: 8 MiB in 1 MiB chunks, chunk 2 a hole; it lives only in S3.
    let f = d.dir.path().join("disk.raw");
    write_image(&f, 8 * MIB, &[(2 * MIB, MIB)], 31);
    d.cli_ok(&["image", "add", "seed", "--file", f.to_str().unwrap()]);
    move_to_s3(&d, "seed", "base");
    let base_chunks = bucket.keys("chunks/").len();
    assert_eq!(base_chunks, 7);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    qemu_io(&d, "volumes/v", &["write -P 0xab 4096 8192"]);
    d.cli_ok(&["volume", "snapshot", "v", "s1"]);
    qemu_io(&d, "volumes/v", &["write -P 0xcd 5M 64k"]);

    let out_s1 = d.cli_ok(&["image", "create", "img-s1", "--from-volume", "v@s1"]);
    let out_v = d.cli_ok(&["image", "create", "img-v", "--from-volume", "v"]);

    assert_eq!(field(&out_s1, "store"), "s3", "{out_s1}");
    assert!(
        out_s1.contains("chunks: 8 (1 new, 6 shared, 1 holes)"),
        "{out_s1}"
    );
    // Chunk 0 is shared with img-s1 now (found by head); chunk 5 is the only new one.
    assert!(
        out_v.contains("chunks: 8 (1 new, 6 shared, 1 holes)"),
        "{out_v}"
    );
    assert!(!out_v.contains("note:"), "{out_v}");
    assert_eq!(bucket.keys("chunks/").len(), base_chunks + 2);
    let row = d.show("img-v");
    assert_eq!(row["store"], "s3");
    assert_eq!(row["source"]["kind"], "native");
    assert_eq!(row["status"], "active");
    let manifest = row["manifest_key"].as_str().unwrap().to_string();
    assert!(
        bucket.has(&manifest),
        "no manifest {manifest} in the bucket"
    );
    // Content: equal to the volume, with the checksums the report gave.
    let raw = d.dir.path().join("v.raw");
    run_ok(Command::new("nbdcopy").args([&d.uri("volumes/v"), raw.to_str().unwrap()]));
    assert_eq!(field(&out_v, "md5"), digest("md5sum", &raw));
    assert_eq!(field(&out_v, "sha256"), digest("sha256sum", &raw));
    assert_eq!(row["md5"], digest("md5sum", &raw));
    assert_same(&d, "images/img-v", "volumes/v");
    d.cli_ok(&["volume", "create", "c", "--snapshot", "v@s1"]);
    assert_same(&d, "images/img-s1", "volumes/c");
    // Usable like any remote image: a volume over it, and on another daemon by manifest.
    d.cli_ok(&["volume", "create", "w", "--image", "img-v"]);
    assert_same(&d, "volumes/w", "volumes/v");
    let other = Daemon::start_with_config(&cfg);
    other.cli_ok(&[
        "image",
        "add",
        "elsewhere",
        "--store",
        "s3",
        "--manifest",
        &manifest,
    ]);
    let copy = other.dir.path().join("elsewhere.raw");
    run_ok(Command::new("nbdcopy").args([&other.uri("images/elsewhere"), copy.to_str().unwrap()]));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&raw).unwrap(),
        "the image read on another daemon differs from the volume"
    );
    drop(other);

    // With the store gone, creation fails and leaves no row.
    qemu_io(&d, "volumes/v", &["write -P 0xef 7M 4k"]);
    drop(moto.take());
    let err = d.cli_err(&["image", "create", "img-fail", "--from-volume", "v"]);

    assert!(err.contains("store operation failed"), "{err}");
    assert_eq!(image_names(&d), ["base", "img-s1", "img-v"]);
}

/// `image create NAME --from-volume v --store s3` running in the background.
fn start_creation(d: &Daemon, name: &str) -> std::process::Child {
    Command::new(common::bin())
        .args([
            "image",
            "create",
            name,
            "--from-volume",
            "v",
            "--store",
            "s3",
        ])
        .env("IMGCACHE_STATE_DIR", &d.state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Wait until the bucket holds `n` chunks, while `cli` still runs.
fn wait_for_uploads(bucket: &Bucket, cli: &mut std::process::Child, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while bucket.keys("chunks/").len() < n {
        assert!(
            Instant::now() < deadline,
            "not {n} chunks uploaded within 60 s"
        );
        assert!(
            cli.try_wait().unwrap().is_none(),
            "the creation ended before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn interrupted_image_creation_in_s3_leaves_no_row_and_a_retry_reuses_its_chunks() {
    let moto = Moto::start();
    moto.create_bucket("images");
    let bucket = Bucket::open(&moto, "images");
    let mut d = Daemon::start_with_config(&(s3_config(&moto, "images") + CACHE_CONFIG));
    // Base: a raw object on a slow HTTP server, 32 chunks of 256 KiB, 4 of them zero.
    let root = d.dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    write_image(&root.join("disk.raw"), 8 * MIB, &[(MIB, MIB)], 41);
    let mut slow = RangeServerConfig::new(&root);
    slow.latency = Duration::from_millis(150);
    let web = Web::start_with(slow);
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
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);

    // 1. The client goes away mid-way: the daemon cancels, removes the row and manifest.
    let (mut cli, before) = (start_creation(&d, "part"), bucket.keys("chunks/").len());
    wait_for_uploads(&bucket, &mut cli, before + 3);
    cli.kill().unwrap();
    cli.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while image_names(&d).contains(&"part".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the interrupted image's row stays"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_cancel = bucket.keys("chunks/").len();
    assert!(
        bucket.keys("manifests/").is_empty(),
        "{:?}",
        bucket.keys("manifests/")
    );
    assert!(
        (3..28).contains(&after_cancel),
        "{after_cancel} chunks left behind"
    );

    // 2. The daemon dies mid-way: start-up removes the row.
    let mut cli = start_creation(&d, "part2");
    wait_for_uploads(&bucket, &mut cli, after_cancel + 1);
    d.kill_and_restart();
    cli.wait().unwrap();
    let left = bucket.keys("chunks/").len();
    assert_eq!(image_names(&d), ["base"]);
    assert!(
        bucket.keys("manifests/").is_empty(),
        "{:?}",
        bucket.keys("manifests/")
    );
    assert!(
        left > after_cancel && left < 28,
        "{left} chunks left behind"
    );

    let out = d.cli_ok(&[
        "image",
        "create",
        "full",
        "--from-volume",
        "v",
        "--store",
        "s3",
    ]);

    assert_eq!(field(&out, "store"), "s3", "{out}");
    assert!(
        out.contains(&format!(
            "chunks: 32 ({} new, {left} shared, 4 holes)",
            28 - left
        )),
        "{out}"
    );
    assert!(field(&out, "note").contains("raw object"), "{out}");
    assert_eq!(bucket.keys("chunks/").len(), 28);
    assert_eq!(bucket.keys("manifests/").len(), 1);
    assert_eq!(image_names(&d), ["base", "full"]);
}

#[test]
fn image_from_a_volume_of_a_raw_object_stays_local_and_says_why() {
    require(&["qemu-img"]);
    let d = Daemon::start();
    let root = d.dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    write_image(&root.join("disk.raw"), 2 * MIB, &[], 51);
    let web = Web::start(&root);
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
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);

    let out = d.cli_ok(&["image", "create", "img", "--from-volume", "v"]);
    let err = d.cli_err(&[
        "image",
        "create",
        "x",
        "--from-volume",
        "v",
        "--store",
        "nope",
    ]);

    assert_eq!(field(&out, "store"), "local", "{out}");
    assert!(
        out.contains("chunks: 8 (8 new, 0 shared, 0 holes)"),
        "{out}"
    );
    assert!(field(&out, "note").contains("raw object"), "{out}");
    assert_eq!(d.show("img")["store"], "local");
    assert_same(&d, "images/img", "volumes/v");
    assert!(err.contains("no store named \"nope\""), "{err}");
    assert_eq!(image_names(&d), ["base", "img"]);
}
