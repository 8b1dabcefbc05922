#!/usr/bin/env bash
# Build the tiny VM the volume boot test runs, from Debian packages alone, into OUT
# (default target/vm-fixture): vmlinuz (linux-image-cloud-amd64), initrd.img (busybox-static
# plus the virtio block modules; its init switch_roots to /dev/vda) and root.img (ext4 made
# with mkfs.ext4 -d; its init prints the previous boot's marker, writes a new one, powers off).
#
# Needs: apt-get (with lists updated), dpkg, mkfs.ext4 (e2fsprogs), xz or zstd for compressed
# modules. Idempotent: does nothing when OUT/done exists.
set -euo pipefail

OUT=${1:-target/vm-fixture}
if [[ -f $OUT/done ]]; then
    exit 0
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# The metapackage names the versioned kernel package.
KPKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $KPKG ]]; then
    echo "cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2
    exit 1
fi
apt-get download -q "$KPKG" busybox-static >/dev/null
mkdir pkg
for deb in ./*.deb; do
    dpkg -x "$deb" pkg
done
BB=pkg/bin/busybox
VMLINUZ=$(ls pkg/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=pkg/lib/modules/$KVER/kernel

# initramfs
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/newroot initrd/lib/modules
cp "$BB" initrd/bin/busybox
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
for m in $MODS; do
    f=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
    if [[ -z $f ]]; then
        # Built into this kernel: nothing to load.
        continue
    fi
    case $f in
        *.xz) xz -dc "$f" >"initrd/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"initrd/lib/modules/$m.ko" ;;
        *) cp "$f" "initrd/lib/modules/$m.ko" ;;
    esac
done
cat >initrd/init <<EOF
#!/bin/busybox sh
B=/bin/busybox
\$B mount -t proc proc /proc
\$B mount -t sysfs sys /sys
\$B mount -t devtmpfs dev /dev
for m in $MODS; do
    [ -f /lib/modules/\$m.ko ] && \$B insmod /lib/modules/\$m.ko
done
n=0
while [ ! -b /dev/vda ] && [ \$n -lt 100 ]; do \$B sleep 0.1; n=\$((n+1)); done
if ! \$B mount -t ext4 /dev/vda /newroot; then
    echo "IMGCACHE-ERROR: cannot mount /dev/vda"
    \$B poweroff -f
fi
\$B umount /proc /sys
\$B mount --move /dev /newroot/dev
exec \$B switch_root /newroot /sbin/init
EOF
chmod +x initrd/init
(cd initrd && find . | "$WORK/$BB" cpio -o -H newc 2>/dev/null | gzip -9 >"$OUT/initrd.img")

# root file system
mkdir -p root/bin root/sbin root/proc root/dev root/etc
cp "$BB" root/bin/busybox
cat >root/sbin/init <<'EOF'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
echo "IMGCACHE-PREV: $($B cat /marker 2>/dev/null || echo none)"
$B cat /proc/sys/kernel/random/uuid >/marker
$B sync
echo "IMGCACHE-WROTE: $($B cat /marker)"
$B poweroff -f
EOF
chmod +x root/sbin/init
mkfs.ext4 -q -F -L root -d root "$OUT/root.img" 32M
cp "$VMLINUZ" "$OUT/vmlinuz"
echo "$KPKG" >"$OUT/done"
echo "VM fixture in $OUT (kernel $KVER)"
