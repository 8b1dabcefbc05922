#!/usr/bin/env bash
# Read throughput of a local image over NBD: imgcache vs qemu-nbd vs nbdkit, in one run on
# the same 1 GiB random image on tmpfs, measured with fio's nbd engine.
#
#   benches/nbd_read.sh            # ROUNDS=3 RUNTIME=6 SIZE=1G by default
#   BASE_BIN=/tmp/imgcache-old benches/nbd_read.sh   # also measure another imgcache build
#
# Prints a markdown table (median of ROUNDS, interleaved) with imgcache's ratio to each peer.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-6}
SIZE=${SIZE:-1G}
W=${BENCH_DIR:-/dev/shm/imgcache-bench-read}

for t in fio qemu-nbd nbdkit python3; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install fio qemu-utils nbdkit)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release/imgcache

cleanup() {
  [ -n "${IMGCACHE_PID:-}" ] && kill "$IMGCACHE_PID" 2>/dev/null || true
  [ -n "${QEMU_PID:-}" ] && kill "$QEMU_PID" 2>/dev/null || true
  [ -n "${NBDKIT_PID:-}" ] && kill "$NBDKIT_PID" 2>/dev/null || true
  [ -n "${BASE_PID:-}" ] && kill "$BASE_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W"
IMG=$W/image.raw
head -c "$SIZE" /dev/urandom > "$IMG"

"$BIN" serve --state-dir "$W/state" --nbd-tcp off >"$W/imgcache.log" 2>&1 &
IMGCACHE_PID=$!
for _ in $(seq 100); do [ -S "$W/state/control.sock" ] && break; sleep 0.1; done
IMGCACHE_STATE_DIR=$W/state "$BIN" image add bench --file "$IMG" >/dev/null
if [ -n "${BASE_BIN:-}" ]; then
  "$BASE_BIN" serve --state-dir "$W/base" --nbd-tcp off >"$W/base.log" 2>&1 &
  BASE_PID=$!
  for _ in $(seq 100); do [ -S "$W/base/control.sock" ] && break; sleep 0.1; done
  IMGCACHE_STATE_DIR=$W/base "$BASE_BIN" image add bench --file "$IMG" >/dev/null
fi
qemu-nbd -r -f raw -x img -e 8 --persistent --socket="$W/qemu.sock" "$IMG" &
QEMU_PID=$!
nbdkit -f -r -U "$W/nbdkit.sock" file "$IMG" &
NBDKIT_PID=$!
for _ in $(seq 100); do [ -S "$W/qemu.sock" ] && [ -S "$W/nbdkit.sock" ] && break; sleep 0.1; done

declare -A URI=(
  [imgcache]="nbd+unix:///images/bench?socket=$W/state/nbd.sock"
  [qemu-nbd]="nbd+unix:///img?socket=$W/qemu.sock"
  [nbdkit]="nbd+unix:///?socket=$W/nbdkit.sock"
)
SERVERS=(imgcache qemu-nbd nbdkit)
if [ -n "${BASE_BIN:-}" ]; then
  URI[imgcache-base]="nbd+unix:///images/bench?socket=$W/base/nbd.sock"
  SERVERS+=(imgcache-base)
fi
[ -n "${SKIP_QEMU:-}" ] && SERVERS=("${SERVERS[@]/qemu-nbd}")
declare -A WL=(
  [seqread-1M-qd8]="--rw=read --bs=1M --iodepth=8"
  [randread-4K-qd32]="--rw=randread --bs=4k --iodepth=32"
)
WORKLOADS=(seqread-1M-qd8 randread-4K-qd32)

RES=$W/results.txt; : > "$RES"
for r in $(seq "$ROUNDS"); do
  for wl in "${WORKLOADS[@]}"; do
    for s in "${SERVERS[@]}"; do
      [ -n "$s" ] || continue
      # shellcheck disable=SC2086
      fio --name=b --ioengine=nbd --uri="${URI[$s]}" --size="$SIZE" ${WL[$wl]} \
          --runtime="$RUNTIME" --time_based --output-format=json --output="$W/fio.json" >/dev/null
      python3 - "$W/fio.json" "$s" "$wl" >> "$RES" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["read"]
print(sys.argv[2], sys.argv[3], j["bw_bytes"] / 2**20, j["iops"])
PY
    done
  done
done

python3 - "$RES" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
res = {}
for s, wl, mib, iops in rows:
    res.setdefault((s, wl), []).append((float(mib), float(iops)))
med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in res.items()}
wls = ["seqread-1M-qd8", "randread-4K-qd32"]
names = {k[0] for k in med}
peers = [p for p in ["qemu-nbd", "nbdkit"] if p in names]
others = sorted(names - set(peers) - {"imgcache"})
print("| workload | server | MiB/s | IOPS | imgcache ÷ server |")
print("|---|---|---:|---:|---:|")
for wl in wls:
    mine = med[("imgcache", wl)]
    for s in ["imgcache"] + peers + others:
        m = med[(s, wl)]
        ratio = "—" if s == "imgcache" else f"{mine[0] / m[0]:.2f}x"
        print(f"| {wl} | {s} | {m[0]:.0f} | {m[1]:.0f} | {ratio} |")
for wl in wls:
    best = max(med[(p, wl)][0] for p in peers)
    print(f"{wl}: imgcache / best peer = {med[('imgcache', wl)][0] / best:.2f}x (goal >= 1.25x)")
PY
