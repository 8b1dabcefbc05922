#!/usr/bin/env bash
# The FUSE export vs nbdfuse over nbdkit, in one run on the same random image on tmpfs,
# measured with fio (libaio, O_DIRECT) on the files.
#
#   benches/fuse.sh            # ROUNDS=3 RUNTIME=5 SIZE=512M by default; needs root
#
# Prints a markdown table (median of ROUNDS, rounds interleaved) with imgcache's ratio.
# Reads: MOUNT/images/bench vs `nbdfuse -r` over `nbdkit file IMG`. Random writes: a daemon
# volume of the image (MOUNT/volumes/bench) vs `nbdfuse` over `nbdkit --filter=cow file IMG`
# (both copy-on-write over the same image).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-512M}
W=${BENCH_DIR:-/dev/shm/imgcache-bench-fuse}

for t in fio nbdfuse nbdkit python3; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install fio nbdfuse nbdkit)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release/imgcache

cleanup() {
  [ -n "${NBDFUSE_PID:-}" ] && { umount "$W/nf" 2>/dev/null || umount -l "$W/nf" 2>/dev/null || true; }
  [ -n "${NBDFUSE_COW_PID:-}" ] && { umount "$W/nfc" 2>/dev/null || umount -l "$W/nfc" 2>/dev/null || true; }
  [ -n "${IMGCACHE_PID:-}" ] && kill "$IMGCACHE_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W/nf" "$W/nfc"
IMG=$W/image.raw
head -c "$SIZE" /dev/urandom > "$IMG"

"$BIN" serve --state-dir "$W/state" --nbd-tcp off --fuse-mount "$W/mnt" >"$W/imgcache.log" 2>&1 &
IMGCACHE_PID=$!
for _ in $(seq 100); do [ -S "$W/state/control.sock" ] && break; sleep 0.1; done
IMGCACHE_STATE_DIR=$W/state "$BIN" image add bench --file "$IMG" >/dev/null
IMGCACHE_STATE_DIR=$W/state "$BIN" volume create bench --image bench >/dev/null
nbdfuse -r "$W/nf/disk" [ nbdkit file "$IMG" ] &
NBDFUSE_PID=$!
nbdfuse "$W/nfc/disk" [ nbdkit --filter=cow file "$IMG" ] &
NBDFUSE_COW_PID=$!
for f in "$W/nf/disk" "$W/nfc/disk" "$W/mnt/volumes/bench"; do
  for _ in $(seq 100); do [ -f "$f" ] && break; sleep 0.1; done
done

# Files by workload kind (read, write) and server.
declare -A FILE=(
  [read-imgcache]="$W/mnt/images/bench"
  [read-nbdfuse]="$W/nf/disk"
  [write-imgcache]="$W/mnt/volumes/bench"
  [write-nbdfuse]="$W/nfc/disk"
)
SERVERS=(imgcache nbdfuse)
declare -A WL=(
  [seqread-1M-qd8]="--rw=read --bs=1M --iodepth=8"
  [randread-4K-qd32]="--rw=randread --bs=4k --iodepth=32"
  [randwrite-4K-qd32]="--rw=randwrite --bs=4k --iodepth=32"
)
WORKLOADS=(seqread-1M-qd8 randread-4K-qd32 randwrite-4K-qd32)

RES=$W/results.txt; : > "$RES"
for r in $(seq "$ROUNDS"); do
  for wl in "${WORKLOADS[@]}"; do
    for s in "${SERVERS[@]}"; do
      kind=read; [[ $wl == *write* ]] && kind=write
      # shellcheck disable=SC2086
      fio --name=b --ioengine=libaio --direct=1 --filename="${FILE[$kind-$s]}" --size="$SIZE" \
          ${WL[$wl]} --runtime="$RUNTIME" --time_based --output-format=json \
          --output="$W/fio.json" >/dev/null
      python3 - "$W/fio.json" "$s" "$wl" "$kind" >> "$RES" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0][sys.argv[4]]
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
print("| workload (libaio, O_DIRECT) | file served by | MiB/s | IOPS | imgcache ÷ it |")
print("|---|---|---:|---:|---:|")
for wl in ["seqread-1M-qd8", "randread-4K-qd32", "randwrite-4K-qd32"]:
    ours = med[("imgcache", wl)][0]
    for s in ["imgcache", "nbdfuse"]:
        mib, iops = med[(s, wl)]
        ratio = "—" if s == "imgcache" else f"{ours / mib:.2f}x"
        name = {"imgcache": "imgcache volume", "nbdfuse": "nbdfuse, nbdkit cow"}[s] if "write" in wl else s
        print(f"| {wl} | {name} | {mib:.0f} | {iops:.0f} | {ratio} |")
PY
