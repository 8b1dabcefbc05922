//! End to end: `image create NAME --from-volume VOL[@SNAP]` makes a native image equal to
//! the volume (or snapshot), storing only the chunks the volume changed; checked with real
//! NBD clients (qemu-io, qemu-img compare, nbdcopy) and md5sum/sha256sum.

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

fn qemu_io(d: &Daemon, export: &str, cmd: &str) {
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &d.uri(export), "-c", cmd]));
    assert!(!out.contains("failed"), "qemu-io {cmd}: {out}");
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn chunks(d: &Daemon) -> usize {
    count_files(&d.state.join("store/chunks"))
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

/// Field `key` of a `key: value` line of the CLI's report.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
        .trim()
        .to_string()
}

/// Image `base` (8 MiB, 1 MiB chunks, one hole chunk at 2M), volume `v` over it with
/// chunk 0 changed before snapshot `s1` and chunk 5 changed after.
fn setup(d: &Daemon) {
    let f = d.dir.path().join("base.raw");
    write_image(&f, 8 * MIB, &[(2 * MIB, MIB)], 7);
    d.cli_ok(&[
        "image",
        "add",
        "base",
        "--file",
        f.to_str().unwrap(),
        "--arch",
        "aarch64",
        "--os-type",
        "windows",
        "--min-ram",
        "1G",
    ]);
    d.cli_ok(&["volume", "create", "v", "--image", "base"]);
    qemu_io(d, "volumes/v", "write -P 0xab 4096 8192");
    d.cli_ok(&["volume", "snapshot", "v", "s1"]);
    qemu_io(d, "volumes/v", "write -P 0xcd 5M 64k");
}

#[test]
fn image_from_volume_equals_volume_and_stores_only_changed_chunks() {
    require(&["qemu-io", "qemu-img", "nbdcopy", "md5sum", "sha256sum"]);
    let d = Daemon::start();
    setup(&d);
    let before = chunks(&d);

    let out = d.cli_ok(&["image", "create", "img-s1", "--from-volume", "v@s1"]);
    assert!(
        out.contains("chunks: 8 (1 new, 6 shared, 1 holes)"),
        "{out}"
    );
    assert_eq!(chunks(&d), before + 1);
    // Not equal to the base: chunk 0 differs.
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .args([d.uri("images/img-s1"), d.uri("images/base")])
        .output()
        .unwrap();
    assert!(!cmp.status.success());

    let out = d.cli_ok(&[
        "image",
        "create",
        "img-v",
        "--from-volume",
        "v",
        "--description",
        "mine",
    ]);
    // Chunk 0 is shared with img-s1 now; chunk 5 is the only new one.
    assert!(
        out.contains("chunks: 8 (1 new, 6 shared, 1 holes)"),
        "{out}"
    );
    assert_eq!(chunks(&d), before + 2);
    assert_same(&d, "images/img-v", "volumes/v");

    let raw = d.dir.path().join("v.raw");
    run_ok(Command::new("nbdcopy").args([&d.uri("volumes/v"), raw.to_str().unwrap()]));
    assert_eq!(field(&out, "md5"), digest("md5sum", &raw));
    assert_eq!(field(&out, "sha256"), digest("sha256sum", &raw));

    let row = d.show("img-v");
    assert_eq!(row["architecture"], "aarch64");
    assert_eq!(row["os_type"], "windows");
    assert_eq!(row["min_ram"].as_u64(), Some(1 << 30));
    assert_eq!(row["description"], "mine");
    assert_eq!(row["status"], "active");
    assert_eq!(row["md5"], digest("md5sum", &raw));
}

#[test]
fn image_from_snapshot_equals_the_snapshot_not_the_volume() {
    require(&["qemu-io", "qemu-img"]);
    let d = Daemon::start();
    setup(&d);
    d.cli_ok(&["image", "create", "img-s1", "--from-volume", "v@s1"]);
    d.cli_ok(&["volume", "create", "c", "--snapshot", "v@s1"]);
    assert_same(&d, "images/img-s1", "volumes/c");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .args([d.uri("images/img-s1"), d.uri("volumes/v")])
        .output()
        .unwrap();
    assert!(
        !cmp.status.success(),
        "the snapshot predates the write at 5M"
    );
    // Nothing was copied for the snapshot: only v and c have overlays.
    assert_eq!(count_dirs(&d.state.join("volumes")), 2);
}

fn count_dirs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count()
}

#[test]
fn image_from_volume_bad_input_fails_cleanly() {
    require(&["qemu-io"]);
    let d = Daemon::start();
    setup(&d);
    let before = chunks(&d);

    let err = d.cli_err(&["image", "create", "x", "--from-volume", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = d.cli_err(&["image", "create", "x", "--from-volume", "v@nope"]);
    assert!(err.contains("no snapshot \"nope\""), "{err}");
    let err = d.cli_err(&["image", "create", "x", "--from-volume", "v@"]);
    assert!(err.contains("VOLUME@SNAPSHOT"), "{err}");
    let err = d.cli_err(&["image", "create", "base", "--from-volume", "v"]);
    assert!(err.contains("exists"), "{err}");
    let err = d.cli_err(&["image", "create", "base", "--from-volume", "v@s1"]);
    assert!(err.contains("exists"), "{err}");

    let list = d.cli_ok(&["image", "list", "--all", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(chunks(&d), before);
    assert_eq!(count_dirs(&d.state.join("volumes")), 1);
}
