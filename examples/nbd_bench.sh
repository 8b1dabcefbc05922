#!/bin/bash
# Compare the NBD server (examples/nbd_serve.rs) with nbdkit and qemu-nbd using fio's nbd engine.
# Usage: examples/nbd_bench.sh [runtime-seconds]   (needs fio, nbdkit, qemu-nbd; uses /dev/shm)
set -eu
R=${1:-6}
D=$(mktemp -d /dev/shm/nbdbench.XXXXXX)
trap 'kill $(cat $D/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$D"' EXIT
dd if=/dev/urandom of=$D/img bs=1M count=1024 status=none
cargo build --release --example nbd_serve -q
target/release/examples/nbd_serve $D/img $D/x.sock --name img 2>/dev/null & echo $! > $D/x.pid
nbdkit -r -U $D/nk.sock --pidfile $D/nk.pid file $D/img
qemu-nbd -r -t -f raw -x img -k $D/q.sock -e 8 $D/img & echo $! > $D/q.pid
sleep 1
bench() { # SOCK EXPORT
  for spec in "randread 4k 32" "read 1M 8"; do
    set -- $spec
    fio --name=t --ioengine=nbd --uri="nbd+unix:///$E?socket=$S" --rw=$1 --bs=$2 --iodepth=$3 \
      --runtime=$R --time_based --direct=1 --size=1G --output-format=terse --terse-version=3 \
      2>/dev/null | grep '^3;' | awk -F';' -v n="$1 $2 qd$3" '{printf "  %-16s %6.0f MiB/s %7d IOPS\n", n, $7/1024, $8}'
  done
}
for name in imgcache:x:img nbdkit:nk: qemu-nbd:q:img; do
  IFS=: read -r label sock E <<<"$name"; S=$D/$sock.sock
  echo "$label"; bench
done
