#!/usr/bin/env bash
# Copy-on-write volume I/O over NBD: imgcache volumes vs qemu-nbd (qcow2 overlay on the raw
# base) vs nbdkit's cow filter, one run on the same random base image on tmpfs, with fio's
# nbd engine. Sequential writes are measured twice: into a fresh overlay, and over a volume
# that the random-write run left scattered. Then the read cost of a volume with 1 vs 16
# snapshots.
#
#   benches/volume.sh            # SIZE=1G RUNTIME=8 by default
#
# Prints markdown tables with imgcache's ratio to the best peer.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-8}
SIZE=${SIZE:-1G}
W=${BENCH_DIR:-/dev/shm/imgcache-bench-volume}

for t in fio qemu-nbd qemu-img nbdkit python3; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install fio qemu-utils nbdkit)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release/imgcache

cleanup() {
  for p in ${IMGCACHE_PID:-} ${QEMU_PID:-} ${NBDKIT_PID:-}; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W"
IMG=$W/image.raw
head -c "$SIZE" /dev/urandom > "$IMG"
export IMGCACHE_STATE_DIR=$W/state

"$BIN" serve --state-dir "$W/state" --nbd-tcp off >"$W/imgcache.log" 2>&1 &
IMGCACHE_PID=$!
for _ in $(seq 100); do [ -S "$W/state/control.sock" ] && break; sleep 0.1; done
"$BIN" image add bench --file "$IMG" >/dev/null
# Two targets per server: "vol" takes the random writes, then the sequential overwrite and
# the reads; "fresh" takes a sequential write into a new, empty overlay.
for t in vol fresh; do
  "$BIN" volume create "$t" --image bench >/dev/null
  qemu-img create -q -f qcow2 -b "$IMG" -F raw "$W/$t.qcow2"
  qemu-nbd -f qcow2 -x vol -e 8 --persistent --cache=writeback --socket="$W/qemu-$t.sock" \
    "$W/$t.qcow2" &
  QEMU_PID="${QEMU_PID:-} $!"
  # The cow filter keeps its overlay in $TMPDIR: on tmpfs like everyone else's.
  TMPDIR=$W nbdkit -f -U "$W/nbdkit-$t.sock" --filter=cow file "$IMG" &
  NBDKIT_PID="${NBDKIT_PID:-} $!"
done
for _ in $(seq 100); do
  [ -S "$W/qemu-fresh.sock" ] && [ -S "$W/nbdkit-fresh.sock" ] && break; sleep 0.1
done

uri() { # SERVER TARGET
  case $1 in
    imgcache) echo "nbd+unix:///volumes/$2?socket=$W/state/nbd.sock" ;;
    qemu-qcow2) echo "nbd+unix:///vol?socket=$W/qemu-$2.sock" ;;
    nbdkit-cow) echo "nbd+unix:///?socket=$W/nbdkit-$2.sock" ;;
  esac
}
SERVERS=(imgcache qemu-qcow2 nbdkit-cow)
declare -A WL=(
  [randwrite-4K-qd32]="--rw=randwrite --bs=4k --iodepth=32"
  [seqwrite-1M-qd8-fresh]="--rw=write --bs=1M --iodepth=8"
  [seqwrite-1M-qd8-over-random]="--rw=write --bs=1M --iodepth=8"
  [randread-4K-qd32]="--rw=randread --bs=4k --iodepth=32"
)
declare -A TARGET=(
  [randwrite-4K-qd32]=vol
  [seqwrite-1M-qd8-fresh]=fresh
  [seqwrite-1M-qd8-over-random]=vol
  [randread-4K-qd32]=vol
)
WORKLOADS=(randwrite-4K-qd32 seqwrite-1M-qd8-fresh seqwrite-1M-qd8-over-random randread-4K-qd32)

fio_run() { # URI WORKLOAD-ARGS... ; prints "MiB/s IOPS" of the job's read+write
  local uri=$1; shift
  # shellcheck disable=SC2068
  fio --name=b --ioengine=nbd --uri="$uri" --size="$SIZE" $@ \
      --runtime="$RUNTIME" --time_based --output-format=json --output="$W/fio.json" >/dev/null
  python3 - "$W/fio.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
bw = j["read"]["bw_bytes"] + j["write"]["bw_bytes"]
print(bw / 2**20, j["read"]["iops"] + j["write"]["iops"])
PY
}

RES=$W/results.txt; : > "$RES"
# Workload order is the same for every server (reads come after the writes), servers
# interleaved within each workload.
for wl in "${WORKLOADS[@]}"; do
  for s in "${SERVERS[@]}"; do
    echo "$s $wl $(fio_run "$(uri "$s" "${TARGET[$wl]}")" ${WL[$wl]})" >> "$RES"
  done
done

# Snapshot chains: 1 vs 16 snapshots, each after 4 MiB of random 4K writes.
for n in 1 16; do
  "$BIN" volume create "chain$n" --image bench >/dev/null
  for i in $(seq "$n"); do
    fio --name=w --ioengine=nbd --uri="nbd+unix:///volumes/chain$n?socket=$W/state/nbd.sock" \
        --size="$SIZE" --rw=randwrite --bs=4k --iodepth=32 --io_size=4M >/dev/null
    "$BIN" volume snapshot "chain$n" "s$i" >/dev/null
  done
  echo "chain$n randread-4K-qd32 $(fio_run "nbd+unix:///volumes/chain$n?socket=$W/state/nbd.sock" ${WL[randread-4K-qd32]})" >> "$RES"
done

python3 - "$RES" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
res = {(s, wl): (float(m), float(i)) for s, wl, m, i in rows}
wls = ["randwrite-4K-qd32", "seqwrite-1M-qd8-fresh", "seqwrite-1M-qd8-over-random",
       "randread-4K-qd32"]
peers = ["qemu-qcow2", "nbdkit-cow"]
print("| workload | imgcache | qemu-nbd qcow2 | nbdkit cow | imgcache ÷ best peer |")
print("|---|---:|---:|---:|---:|")
for wl in wls:
    fmt = (lambda v: f"{v[0]/1024:.2f} GiB/s") if wl.startswith("seq") else (lambda v: f"{v[1]/1000:.1f}k IOPS")
    mine = res[("imgcache", wl)]
    best = max(res[(p, wl)][0] for p in peers)
    print(f"| {wl} | {fmt(mine)} | {fmt(res[('qemu-qcow2', wl)])} | {fmt(res[('nbdkit-cow', wl)])} | {mine[0]/best:.2f}x |")
print()
print("| volume | snapshots | randread-4K-qd32 |")
print("|---|---:|---:|")
for n in (1, 16):
    v = res[(f"chain{n}", "randread-4K-qd32")]
    print(f"| chain{n} | {n} | {v[1]/1000:.1f}k IOPS |")
PY
