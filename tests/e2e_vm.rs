//! End to end: a real VM (qemu-system-x86_64 under TCG) boots from a volume export. The guest
//! mounts its ext4 root from the image through the overlay, writes a marker, powers off; a
//! second boot of the same volume sees it, another volume of the same image does not, and
//! the image's bytes are unchanged. The fixture comes from Debian packages alone
//! (`scripts/build-vm-fixture.sh`, cached in `target/vm-fixture/`). The same scenario through
//! the FUSE file `MOUNT/volumes/NAME` is in `tests/e2e_fuse.rs`.

mod common;

use common::vm::boot_twice_and_check_isolation;
use common::Daemon;

#[test]
fn vm_boots_from_a_volume_and_keeps_its_writes_in_the_overlay() {
    let d = Daemon::start();
    boot_twice_and_check_isolation(&d, |volume| {
        format!(
            "file=nbd+unix:///volumes/{volume}?socket={},format=raw,if=virtio,cache=none",
            d.nbd_sock().display()
        )
    });
}
