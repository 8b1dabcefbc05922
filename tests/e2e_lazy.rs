//! End to end: lazy pulling from real servers (a Rust HTTP range server, moto for S3) through
//! the real daemon and CLI, read by real NBD clients (nbdcopy, qemu-img, qemu-io, fio,
//! nbdinfo).
//!
//! Tests that only drive the CLI and the API (register, push, warm, pin, status, restart,
//! eviction, expunge, store list) run on any tree; the ones that read over NBD need the NBD
//! server.

mod common;
mod common_remote;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{have, run_ok, write_image, Daemon};
use common_remote::moto::Moto;
use common_remote::web::Web;
use imgcache::store::spec::{open_store, StoreSpec};
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

/// `DIR/www/disk.raw`: `size` bytes of random data with a zero region, served by a new
/// range server.
fn serve_disk(d: &Daemon, size: u64, seed: u64) -> (Web, PathBuf) {
    let root = d.dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    let disk = root.join("disk.raw");
    write_image(&disk, size, &[(size / 4, size / 8)], seed);
    (Web::start(&root), disk)
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    serde_json::from_str(&d.cli_ok(args)).unwrap()
}

fn cache_row(d: &Daemon, name: &str) -> Value {
    let v = json(d, &["cache", "status", "--json"]);
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no cache row for {name}: {v}"))
}

fn fully_cached(row: &Value) -> bool {
    row["total_bytes"].as_u64().is_some() && row["cached_bytes"] == row["total_bytes"]
}

fn nbdcopy_equals(d: &Daemon, export: &str, source: &Path) {
    let out = d.dir.path().join("copy.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").args([&d.uri(export), out.to_str().unwrap()]));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(source).unwrap(),
        "nbdcopy of {export} differs from {}",
        source.display()
    );
}

// ---- API / CLI only ----

#[test]
fn http_object_registers_without_copying() {
    let d = Daemon::start();
    let (web, disk) = serve_disk(&d, 5 * MIB + 4096, 1);
    let url = format!("{}/disk.raw", web.url);

    let out = d.cli_ok(&["image", "add", "web", "--url", &url, "--chunk-size", "256K"]);

    assert!(out.contains("added image web"), "{out}");
    let row = d.show("web");
    assert_eq!(row["virtual_size"].as_u64(), Some(5 * MIB + 4096));
    assert_eq!(row["chunk_size"].as_u64(), Some(256 * 1024));
    assert_eq!(row["source"]["kind"], "object");
    assert_eq!(row["source"]["url"], url.as_str());
    assert_eq!(row["md5"], Value::Null);
    assert_eq!(web.requests(), 1, "registering is one HEAD, no data");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 5 * MIB + 4096);
}

#[test]
fn missing_object_url_is_not_found() {
    let d = Daemon::start();
    let (web, _) = serve_disk(&d, MIB, 1);

    let err = d.cli_err(&[
        "image",
        "add",
        "x",
        "--url",
        &format!("{}/nope.raw", web.url),
    ]);

    assert!(err.contains("no object at"), "{err}");
    assert!(
        d.cli_ok(&["image", "list"]).lines().count() == 1,
        "no row left"
    );
}

#[test]
fn warm_fills_the_cache_and_a_restart_refetches_nothing() {
    let mut d = Daemon::start();
    let (web, _) = serve_disk(&d, 6 * MIB, 2);
    let url = format!("{}/disk.raw", web.url);
    d.cli_ok(&["image", "add", "web", "--url", &url, "--chunk-size", "1M"]);

    let report = json(&d, &["image", "warm", "web", "--json"]);

    assert_eq!(report["fetched_chunks"].as_u64(), Some(6));
    assert_eq!(report["fetched_bytes"].as_u64(), Some(6 * MIB));
    assert!(fully_cached(&cache_row(&d, "web")));
    let status = json(&d, &["cache", "status", "--json"]);
    assert_eq!(status["fetched_bytes"].as_u64(), Some(6 * MIB));
    let before = web.requests();

    d.restart();
    let again = json(&d, &["image", "warm", "web", "--json"]);

    assert_eq!(again["already_cached"].as_u64(), Some(6), "{again}");
    assert_eq!(again["fetched_chunks"].as_u64(), Some(0), "{again}");
    assert_eq!(web.requests(), before, "nothing fetched after the restart");
    let status = json(&d, &["cache", "status", "--json"]);
    assert_eq!(status["fetched_bytes"].as_u64(), Some(0));
    assert!(fully_cached(&cache_row(&d, "web")));
    let text = d.cli_ok(&["cache", "status"]);
    assert!(text.contains("100.0%"), "{text}");
}

#[test]
fn pinned_image_survives_eviction() {
    let d = Daemon::start_with_config("[cache]\nmax-size = \"16M\"\n");
    let (web, _) = serve_disk(&d, 8 * MIB, 3);
    std::fs::copy(web.root.join("disk.raw"), web.root.join("big.raw")).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(web.root.join("big.raw"))
        .unwrap()
        .set_len(12 * MIB)
        .unwrap();
    d.cli_ok(&[
        "image",
        "add",
        "keep",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);
    d.cli_ok(&[
        "image",
        "add",
        "big",
        "--url",
        &format!("{}/big.raw", web.url),
    ]);
    d.cli_ok(&["image", "warm", "keep", "--pin"]);

    d.cli_ok(&["image", "warm", "big"]);

    let keep = cache_row(&d, "keep");
    assert!(fully_cached(&keep), "{keep}");
    assert_eq!(keep["pinned"], true);
    let status = json(&d, &["cache", "status", "--json"]);
    assert!(status["evicted_chunks"].as_u64().unwrap() > 0, "{status}");
    assert!(
        status["used_bytes"].as_u64().unwrap() <= 16 * MIB,
        "{status}"
    );
    let big = cache_row(&d, "big");
    assert!(!fully_cached(&big), "{big}");
}

#[test]
fn unpin_and_pin_are_reported_in_status() {
    let d = Daemon::start();
    let (web, _) = serve_disk(&d, MIB, 4);
    d.cli_ok(&[
        "image",
        "add",
        "web",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);
    d.cli_ok(&["image", "warm", "web"]);

    d.cli_ok(&["image", "pin", "web"]);
    assert_eq!(cache_row(&d, "web")["pinned"], true);
    d.cli_ok(&["image", "unpin", "web"]);
    assert_eq!(cache_row(&d, "web")["pinned"], false);
}

#[test]
fn warming_a_local_image_is_refused_with_a_reason() {
    let d = Daemon::start();
    let f = d.dir.path().join("a.raw");
    write_image(&f, MIB, &[], 1);
    d.cli_ok(&["image", "add", "loc", "--file", f.to_str().unwrap()]);

    let err = d.cli_err(&["image", "warm", "loc"]);

    assert!(err.contains("local store"), "{err}");
}

#[test]
fn expunge_drops_the_cached_chunks() {
    let d = Daemon::start();
    let (web, _) = serve_disk(&d, 2 * MIB, 5);
    d.cli_ok(&[
        "image",
        "add",
        "web",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);
    d.cli_ok(&["image", "warm", "web"]);
    let id = d.show("web")["id"].as_str().unwrap().to_string();
    let data = d.state.join("cache").join(format!("{id}.data"));
    assert!(data.exists());

    d.cli_ok(&["image", "delete", "web"]);
    d.cli_ok(&["image", "expunge", "web"]);

    assert!(!data.exists());
    let status = json(&d, &["cache", "status", "--json"]);
    assert_eq!(status["used_bytes"].as_u64(), Some(0), "{status}");
    assert!(status["rows"].as_array().unwrap().is_empty(), "{status}");
    assert!(
        web.root.join("disk.raw").exists(),
        "the remote object is not ours"
    );
}

#[test]
fn store_list_probes_each_store() {
    let root = common::tempdir();
    let web = Web::start(root.path());
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let d = Daemon::start_with_config(&format!(
        "[stores.web]\ntype = \"http\"\nurl = \"{}/\"\n\
         [stores.gone]\ntype = \"http\"\nurl = \"http://127.0.0.1:{dead_port}/x\"\nretries = 0\n",
        web.url
    ));

    let v = json(&d, &["store", "list", "--json"]);
    let table = d.cli_ok(&["store", "list"]);

    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["local", "gone", "web"]);
    let by = |n: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by("local")["reachable"], true);
    assert_eq!(by("web")["reachable"], true);
    assert_eq!(by("web")["kind"], "http");
    assert_eq!(by("gone")["reachable"], false);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(table.contains("no ("), "{table}");
}

#[test]
fn bad_cache_config_fails_at_start_with_the_key_named() {
    let dir = common::tempdir();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[cache]\nhigh-watermark = 2\n").unwrap();

    let out = Command::new(common::bin())
        .args([
            "serve",
            "--nbd-tcp",
            "off",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .arg("--state-dir")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();

    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.high-watermark"), "{err}");
}

// ---- S3 (moto) ----

fn s3_config(moto: &Moto, bucket: &str) -> String {
    format!(
        "[stores.s3]\ntype = \"s3\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\n\
         access-key-id = \"test\"\nsecret-access-key = \"test\"\nallow-http = true\n",
        moto.endpoint()
    )
}

#[test]
fn s3_push_then_register_on_a_second_daemon_and_warm() {
    let moto = Moto::start();
    moto.create_bucket("images");
    let cfg = s3_config(&moto, "images");
    let a = Daemon::start_with_config(&cfg);
    let f = a.dir.path().join("disk.raw");
    write_image(&f, 9 * MIB + 512, &[(2 * MIB, 3 * MIB)], 7);
    a.cli_ok(&["image", "add", "deb", "--file", f.to_str().unwrap()]);
    let manifest = a.show("deb")["manifest_key"].as_str().unwrap().to_string();

    let out = a.cli_ok(&["image", "push", "deb", "--store", "s3"]);
    let again = a.cli_ok(&["image", "push", "deb", "--store", "s3"]);

    assert!(out.contains(&manifest), "{out}");
    assert!(out.contains("7 uploaded, 0 already there"), "{out}");
    assert!(again.contains("0 uploaded, 7 already there"), "{again}");

    let b = Daemon::start_with_config(&cfg);
    b.cli_ok(&[
        "image",
        "add",
        "deb2",
        "--store",
        "s3",
        "--manifest",
        &manifest,
    ]);
    let row = b.show("deb2");
    assert_eq!(row["virtual_size"].as_u64(), Some(9 * MIB + 512));
    assert_eq!(row["store"], "s3");
    assert_eq!(row["source"]["kind"], "native");
    let report = json(&b, &["image", "warm", "deb2", "--json"]);
    assert_eq!(report["data_chunks"].as_u64(), Some(7), "{report}");
    assert!(fully_cached(&cache_row(&b, "deb2")));

    if have("nbdcopy") {
        nbdcopy_equals(&b, "images/deb2", &f);
    }
}

#[test]
fn s3_url_of_a_raw_object_uses_the_configured_store() {
    let moto = Moto::start();
    moto.create_bucket("raw");
    let d = Daemon::start_with_config(&s3_config(&moto, "raw"));
    let f = d.dir.path().join("disk.raw");
    write_image(&f, 3 * MIB + 100, &[], 8);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spec: StoreSpec =
        toml::from_str(s3_config(&moto, "raw").split_once('\n').unwrap().1).unwrap();
    let store = open_store("s3", &spec).unwrap();
    rt.block_on(store.put("base/disk.raw", Bytes::from(std::fs::read(&f).unwrap())))
        .unwrap();

    d.cli_ok(&["image", "add", "obj", "--url", "s3://raw/base/disk.raw"]);
    let report = json(&d, &["image", "warm", "obj", "--json"]);

    let row = d.show("obj");
    assert_eq!(row["store"], "s3");
    assert_eq!(row["virtual_size"].as_u64(), Some(3 * MIB + 100));
    assert_eq!(report["fetched_bytes"].as_u64(), Some(3 * MIB + 100));
    if have("nbdcopy") {
        nbdcopy_equals(&d, "images/obj", &f);
    }
}

// ---- NBD reads (need the NBD server) ----

#[test]
fn lazy_http_reads_equal_the_source_with_real_clients() {
    require(&["nbdcopy", "qemu-img", "fio"]);
    let d = Daemon::start();
    let (web, disk) = serve_disk(&d, 24 * MIB, 11);
    d.cli_ok(&[
        "image",
        "add",
        "web",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);

    nbdcopy_equals(&d, "images/web", &disk);
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        disk.to_str().unwrap(),
        &d.uri("images/web"),
    ]));
    assert!(fully_cached(&cache_row(&d, "web")));
}

#[test]
fn fio_verify_over_a_lazily_pulled_image() {
    require(&["fio"]);
    let d = Daemon::start();
    let root = d.dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    let disk = root.join("fio.raw");
    // fio writes the pattern to a local file, which is then served lazily.
    run_ok(Command::new("fio").args([
        "--name=w",
        &format!("--filename={}", disk.display()),
        "--size=16M",
        "--rw=write",
        "--bs=64k",
        "--verify=crc32c",
        "--do_verify=0",
    ]));
    let web = Web::start(&root);
    d.cli_ok(&[
        "image",
        "add",
        "fio",
        "--url",
        &format!("{}/fio.raw", web.url),
    ]);

    run_ok(Command::new("fio").args([
        "--name=w",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("images/fio")),
        "--size=16M",
        "--rw=write",
        "--bs=64k",
        "--verify=crc32c",
        "--verify_only",
    ]));
}

#[test]
fn corruption_in_the_cache_is_healed() {
    require(&["nbdcopy"]);
    let d = Daemon::start();
    let (web, disk) = serve_disk(&d, 4 * MIB, 12);
    d.cli_ok(&[
        "image",
        "add",
        "web",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);
    d.cli_ok(&["image", "warm", "web"]);
    let id = d.show("web")["id"].as_str().unwrap().to_string();
    let data = d.state.join("cache").join(format!("{id}.data"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&[0xA5; 16], MIB + 100).unwrap();
        f.write_all_at(&[0x5A; 16], 3 * MIB + 7).unwrap();
    }

    nbdcopy_equals(&d, "images/web", &disk);

    let status = json(&d, &["cache", "status", "--json"]);
    assert!(status["corrupt_chunks"].as_u64().unwrap() >= 1, "{status}");
    assert!(fully_cached(&cache_row(&d, "web")));
}

#[test]
fn unreachable_store_fails_uncached_reads_within_the_timeout() {
    require(&["qemu-io"]);
    let d = Daemon::start_with_config(
        "[cache]\nfetch-timeout = \"1s\"\nread-timeout = \"2s\"\nreadahead-chunks = 0\n",
    );
    let (mut web, _) = serve_disk(&d, 8 * MIB, 13);
    d.cli_ok(&[
        "image",
        "add",
        "web",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);
    let uri = d.uri("images/web");
    let qemu_io = |cmd: &str| {
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap()
    };
    let warm = qemu_io("read 0 1M");
    assert!(warm.status.success(), "{warm:?}");

    web.kill();
    let started = Instant::now();
    let cold = qemu_io("read 6M 64k");
    let took = started.elapsed();
    let cached = qemu_io("read 0 1M");

    let cold_text =
        String::from_utf8_lossy(&cold.stdout).to_string() + &String::from_utf8_lossy(&cold.stderr);
    assert!(
        cold_text.contains("Input/output error") || !cold.status.success(),
        "{cold_text}"
    );
    assert!(took < Duration::from_secs(8), "failed after {took:?}");
    let cached_text = String::from_utf8_lossy(&cached.stdout);
    assert!(
        cached.status.success() && !cached_text.contains("error"),
        "{cached_text}"
    );
}

#[test]
fn residency_flips_from_remote_to_local() {
    require(&["nbdinfo"]);
    let d = Daemon::start();
    let (web, _) = serve_disk(&d, 4 * MIB, 14);
    d.cli_ok(&[
        "image",
        "add",
        "web",
        "--url",
        &format!("{}/disk.raw", web.url),
    ]);
    let map = || {
        run_ok(Command::new("nbdinfo").args([
            "--map=imgcache:residency",
            "--json",
            &d.uri("images/web"),
        ]))
    };

    let before = map();
    d.cli_ok(&["image", "warm", "web"]);
    let after = map();

    // imgcache:residency flag bit 0 set = remote (not yet local).
    let types = |json: &str| -> Vec<(u64, u64)> {
        let v: serde_json::Value = serde_json::from_str(json).expect("nbdinfo --json map");
        v.as_array()
            .expect("array of extents")
            .iter()
            .map(|e| (e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
            .collect()
    };
    let (b, a) = (types(&before), types(&after));
    assert_eq!(b.iter().map(|e| e.0).sum::<u64>(), 4 * MIB, "{before}");
    assert!(
        b.iter().all(|e| e.1 & 1 == 1),
        "cold image must be all remote: {before}"
    );
    assert_eq!(a.iter().map(|e| e.0).sum::<u64>(), 4 * MIB, "{after}");
    assert!(
        a.iter().all(|e| e.1 & 1 == 0),
        "warm image must be all local: {after}"
    );
}
