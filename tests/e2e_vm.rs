//! End to end: a real VM (qemu-system-x86_64 under TCG) boots from a volume export. The guest
//! mounts its ext4 root from the image through the overlay, writes a marker, powers off; a
//! second boot of the same volume sees it, another volume of the same image does not, and
//! the image's bytes are unchanged. The fixture comes from Debian packages alone
//! (`scripts/build-vm-fixture.sh`, cached in `target/vm-fixture/`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{have, run_ok, Daemon};

fn fixture() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/vm-fixture");
    run_ok(
        Command::new("bash")
            .arg(root.join("scripts/build-vm-fixture.sh"))
            .arg(&out),
    );
    out
}

/// Boot the VM from `export`; returns the serial console output.
fn boot(d: &Daemon, fx: &Path, export: &str) -> String {
    let log = d
        .dir
        .path()
        .join(format!("console-{}.log", export.replace('/', "-")));
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(fx.join("vmlinuz"))
        .arg("-initrd")
        .arg(fx.join("initrd.img"))
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(format!(
            "file=nbd+unix:///{export}?socket={},format=raw,if=virtio,cache=none",
            d.nbd_sock().display()
        ))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "qemu exited with {st}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the VM did not power off within 180 s; console:\n{}",
                String::from_utf8_lossy(&std::fs::read(&log).unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned()
}

fn field<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {key} in the console output:\n{console}"))
}

#[test]
fn vm_boots_from_a_volume_and_keeps_its_writes_in_the_overlay() {
    for t in ["qemu-system-x86_64", "qemu-img", "mkfs.ext4", "apt-get"] {
        assert!(
            have(t),
            "{t} is not installed: run the suite with scripts/test.sh, which installs it"
        );
    }
    let fx = fixture();
    let d = Daemon::start();
    let root = fx.join("root.img");
    let original = std::fs::read(&root).unwrap();
    d.cli_ok(&["image", "add", "vmroot", "--file", root.to_str().unwrap()]);
    d.cli_ok(&["volume", "create", "vm1", "--image", "vmroot"]);
    d.cli_ok(&["volume", "create", "vm2", "--image", "vmroot"]);

    let first = boot(&d, &fx, "volumes/vm1");
    assert_eq!(field(&first, "IMGCACHE-PREV:"), "none", "{first}");
    let wrote = field(&first, "IMGCACHE-WROTE:").to_string();

    let second = boot(&d, &fx, "volumes/vm1");
    assert_eq!(field(&second, "IMGCACHE-PREV:"), wrote, "{second}");

    let other = boot(&d, &fx, "volumes/vm2");
    assert_eq!(field(&other, "IMGCACHE-PREV:"), "none", "{other}");

    let out = d.dir.path().join("image-after.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &d.uri("images/vmroot"),
        out.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&out).unwrap() == original,
        "the image changed"
    );
    assert!(
        std::fs::read(&root).unwrap() == original,
        "the fixture changed"
    );
}
