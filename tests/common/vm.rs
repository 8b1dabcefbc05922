//! Booting a real VM (qemu-system-x86_64 under TCG) from a disk the daemon serves: the
//! fixture of `scripts/build-vm-fixture.sh` (kernel, initrd, ext4 root), cached in
//! `target/vm-fixture/`. The guest mounts its root, prints `IMGCACHE-PREV: <marker or none>`,
//! writes a new marker, prints `IMGCACHE-WROTE: <marker>` and powers off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{have, run_ok};

/// Panics unless every tool the VM tests use is installed.
pub fn require_vm_tools() {
    for t in ["qemu-system-x86_64", "qemu-img", "mkfs.ext4", "apt-get"] {
        assert!(
            have(t),
            "{t} is not installed: run the suite with scripts/test.sh, which installs it"
        );
    }
}

/// Build (or reuse) the fixture; returns its directory.
pub fn fixture() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/vm-fixture");
    run_ok(
        Command::new("bash")
            .arg(root.join("scripts/build-vm-fixture.sh"))
            .arg(&out),
    );
    out
}

/// Boot the VM with `drive` (a qemu `-drive` spec of its root disk); returns the serial
/// console output. `log_dir/console-LABEL.log` keeps it.
pub fn boot(log_dir: &Path, fx: &Path, label: &str, drive: &str) -> String {
    let log = log_dir.join(format!("console-{}.log", label.replace('/', "-")));
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(fx.join("vmlinuz"))
        .arg("-initrd")
        .arg(fx.join("initrd.img"))
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(drive)
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

/// The value after `key` on the console, e.g. `IMGCACHE-PREV:`.
pub fn field<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {key} in the console output:\n{console}"))
}

/// The whole VM scenario on a running daemon: image `vmroot` from the fixture, volumes
/// `vm1` and `vm2` of it; `drive(volume)` gives the `-drive` spec of a volume's disk. The
/// first boot of vm1 finds no marker and writes one, the second boot of vm1 finds it, vm2
/// finds none, and neither the image as served nor the fixture file changed.
pub fn boot_twice_and_check_isolation(d: &super::Daemon, drive: impl Fn(&str) -> String) {
    require_vm_tools();
    let fx = fixture();
    let root = fx.join("root.img");
    let original = std::fs::read(&root).unwrap();
    d.cli_ok(&["image", "add", "vmroot", "--file", root.to_str().unwrap()]);
    d.cli_ok(&["volume", "create", "vm1", "--image", "vmroot"]);
    d.cli_ok(&["volume", "create", "vm2", "--image", "vmroot"]);
    let logs = d.dir.path();

    let first = boot(logs, &fx, "vm1-first", &drive("vm1"));
    assert_eq!(field(&first, "IMGCACHE-PREV:"), "none", "{first}");
    let wrote = field(&first, "IMGCACHE-WROTE:").to_string();

    let second = boot(logs, &fx, "vm1-second", &drive("vm1"));
    assert_eq!(field(&second, "IMGCACHE-PREV:"), wrote, "{second}");

    let other = boot(logs, &fx, "vm2", &drive("vm2"));
    assert_eq!(field(&other, "IMGCACHE-PREV:"), "none", "{other}");

    let out = logs.join("image-after.raw");
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
