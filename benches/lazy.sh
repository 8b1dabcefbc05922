#!/usr/bin/env bash
# Lazy-pulling benchmark: one run on tmpfs, prints a markdown table. Not a timed test.
#
# An HTTP range server (examples/range_server.rs) with 20 ms latency and a 400 Mbit/s cap
# serves a 512 MiB raw image (random data with zero regions). Measured:
#  (a) `imgcache image warm` of the whole image: MB/s and % of the cap;
#  (b) a cold boot-like read (300 scattered 4-64 KiB reads, then ~15% of the image read
#      sequentially in 1 MiB requests; deterministic trace replayed by one qemu-io) through
#      imgcache, through `nbdkit --filter=cache curl`, and by downloading the whole image first;
#  (c) daemon RSS with a 100 GiB sparse raw object registered lazily, idle and after opening
#      the export.
#
# Needs: qemu-io, nbdinfo, nbdkit with the curl plugin (apt install nbdkit
# nbdkit-plugin-curl qemu-utils libnbd-bin), curl, python3.
# Env: IMGCACHE (binary, default target/release/imgcache), RANGE_SERVER (default
# target/release/examples/range_server), SIZE_MIB (512), CHUNK (128K), LATENCY_MS (20),
# RATE_MBIT (400), FETCH_CONCURRENCY (32), READAHEAD (32).
set -euo pipefail

cd "$(dirname "$0")/.."
IMGCACHE=${IMGCACHE:-target/release/imgcache}
RANGE_SERVER=${RANGE_SERVER:-target/release/examples/range_server}
SIZE_MIB=${SIZE_MIB:-512}
CHUNK=${CHUNK:-128K}
LATENCY_MS=${LATENCY_MS:-20}
RATE_MBIT=${RATE_MBIT:-400}
FETCH_CONCURRENCY=${FETCH_CONCURRENCY:-32}
READAHEAD=${READAHEAD:-32}

# Always rebuild (a no-op when up to date) so a stale binary is never measured.
cargo build --release --bin imgcache --example range_server >&2
for t in qemu-io nbdinfo nbdkit curl python3; do
    command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
nbdkit curl --version >/dev/null 2>&1 || { echo "missing nbdkit-plugin-curl" >&2; exit 1; }

W=$(mktemp -d /dev/shm/imgcache-lazy-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/www" "$W/state"
now() { date +%s.%N; }
log() { echo "# $*" >&2; }

log "writing a ${SIZE_MIB} MiB image (random data, 25% zero regions)"
python3 - "$W/www/disk.raw" "$SIZE_MIB" <<'EOF'
import random, sys
path, mib = sys.argv[1], int(sys.argv[2])
r = random.Random(42)
with open(path, "wb") as f:
    for i in range(mib):
        # every 4th MiB region is zeros, like unallocated space in a real disk
        f.write(bytes(1 << 20) if i % 4 == 3 else r.randbytes(1 << 20))
EOF
truncate -s 100G "$W/www/sparse.raw"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$RANGE_SERVER" --root "$W/www" --listen "127.0.0.1:$PORT" --latency-ms "$LATENCY_MS" \
    --rate-mbit "$RATE_MBIT" >"$W/range.log" 2>&1 &
PIDS+=($!)
URL="http://127.0.0.1:$PORT"
for _ in $(seq 100); do curl -sfI "$URL/disk.raw" >/dev/null && break; sleep 0.05; done

cat >"$W/imgcache.toml" <<EOF
nbd-tcp = "off"
[cache]
max-size = "4G"
fetch-concurrency = $FETCH_CONCURRENCY
readahead-chunks = $READAHEAD
EOF
"$IMGCACHE" serve --state-dir "$W/state" --config "$W/imgcache.toml" >"$W/daemon.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
ic() { "$IMGCACHE" --state-dir "$W/state" "$@"; }
for _ in $(seq 200); do ic image list >/dev/null 2>&1 && break; sleep 0.05; done
NBD="nbd+unix:///images/%s?socket=$W/state/nbd.sock"
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$DPID/status"; }

# ---- (c) RSS, before anything else is cached ----
RSS_START=$(rss_kib)
ic image add sparse --url "$URL/sparse.raw" --chunk-size "$CHUNK" >/dev/null
sleep 1
RSS_REG=$(rss_kib)
# shellcheck disable=SC2059
SPARSE_URI=$(printf "$NBD" sparse)
if nbdinfo "$SPARSE_URI" >/dev/null 2>&1; then
    qemu-io -r -f raw -c 'read 0 64k' -c 'read 50G 64k' "$SPARSE_URI" >/dev/null
    sleep 1
    RSS_OPEN=$(rss_kib)
else
    RSS_OPEN=""
fi

# ---- (a) warm ----
ic image add warm --url "$URL/disk.raw" --chunk-size "$CHUNK" >/dev/null
T0=$(now)
ic image warm warm >/dev/null
T1=$(now)
WARM_S=$(python3 -c "print($T1-$T0)")
WARM_MBS=$(python3 -c "print($SIZE_MIB*1.048576/$WARM_S)")
CAP_MBS=$(python3 -c "print($RATE_MBIT/8)")

# ---- (b) boot-like cold read ----
python3 - "$W/trace" "$SIZE_MIB" <<'EOF'
import random, sys
path, mib = sys.argv[1], int(sys.argv[2])
size = mib << 20
r = random.Random(7)
cmds = []
for _ in range(300):
    ln = r.choice([4, 8, 16, 32, 64]) << 10
    off = r.randrange(0, size - ln) // 4096 * 4096
    cmds.append(f"read {off} {ln}")
seq_len = (size * 15 // 100) // (1 << 20) * (1 << 20)
start = (size // 3) // (1 << 20) * (1 << 20)
for off in range(start, start + seq_len, 1 << 20):
    cmds.append(f"read {off} {1 << 20}")
with open(path, "w") as f:
    f.write("\n".join(cmds) + "\n")
print(sum(int(c.split()[2]) for c in cmds), file=open(path + ".bytes", "w"))
EOF
TRACE_BYTES=$(cat "$W/trace.bytes")
replay() { # URI-or-file
    local args=()
    while read -r c; do args+=(-c "$c"); done <"$W/trace"
    qemu-io -r -f raw "${args[@]}" "$1" >/dev/null
}

ic image add boot --url "$URL/disk.raw" --chunk-size "$CHUNK" >/dev/null
# shellcheck disable=SC2059
BOOT_URI=$(printf "$NBD" boot)
if nbdinfo "$BOOT_URI" >/dev/null 2>&1; then
    T0=$(now); replay "$BOOT_URI"; T1=$(now)
    IC_S=$(python3 -c "print($T1-$T0)")
    IC_FETCHED=$(ic cache status --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(next(r["cached_bytes"] for r in v["rows"] if r["name"]=="boot"))')
else
    IC_S=""
    IC_FETCHED=""
fi

"$IMGCACHE" --version >/dev/null
nbdkit -U "$W/nbdkit.sock" --filter=cache curl "$URL/disk.raw" cache-on-read=true \
    --pidfile "$W/nbdkit.pid" >"$W/nbdkit.log" 2>&1
for _ in $(seq 100); do [[ -s $W/nbdkit.pid ]] && break; sleep 0.05; done
PIDS+=("$(cat "$W/nbdkit.pid")")
T0=$(now); replay "nbd+unix:///?socket=$W/nbdkit.sock"; T1=$(now)
NBDKIT_S=$(python3 -c "print($T1-$T0)")

T0=$(now)
curl -sf "$URL/disk.raw" -o "$W/download.raw"
replay "$W/download.raw"
T1=$(now)
DL_S=$(python3 -c "print($T1-$T0)")

# ---- table ----
python3 - <<EOF
size_mib = $SIZE_MIB
warm_s, warm_mbs, cap = $WARM_S, $WARM_MBS, $CAP_MBS
ic = "$IC_S"; nk = $NBDKIT_S; dl = $DL_S
fetched = "$IC_FETCHED"
trace = $TRACE_BYTES
rss = dict(start=$RSS_START, reg=$RSS_REG, open="$RSS_OPEN")
print(f"Setup: {size_mib} MiB raw image (75% random, 25% zero), range server with $LATENCY_MS ms "
      f"latency and a $RATE_MBIT Mbit/s cap, chunk size $CHUNK, fetch-concurrency $FETCH_CONCURRENCY, tmpfs.")
print()
print("| measurement | result | goal |")
print("| --- | --- | --- |")
print(f"| (a) warm {size_mib} MiB | {warm_s:.1f} s, {warm_mbs:.1f} MB/s = {100*warm_mbs/cap:.0f}% of {cap:.0f} MB/s | >= 80% |")
print(f"| (b) boot trace ({trace/2**20:.0f} MiB read, 300 small + 1 MiB sequential) | | |")
if ic:
    ic_s = float(ic)
    print(f"|   imgcache (cold, over NBD) | {ic_s:.2f} s ({int(fetched)/2**20:.0f} MiB fetched) | |")
    print(f"|   nbdkit curl + cache filter | {nk:.2f} s = {nk/ic_s:.1f}x imgcache | imgcache >= 3x faster |")
    print(f"|   download first, then read | {dl:.2f} s = {dl/ic_s:.1f}x imgcache | imgcache >= 2x faster |")
else:
    print("|   imgcache (cold, over NBD) | n/a: this build's NBD server accepts no clients | |")
    print(f"|   nbdkit curl + cache filter | {nk:.2f} s | |")
    print(f"|   download first, then read | {dl:.2f} s | |")
print(f"| (c) RSS, 100 GiB sparse object registered, idle | {rss['reg']/1024:.1f} MiB (at start {rss['start']/1024:.1f} MiB) | < 100 MiB |")
if rss["open"]:
    print(f"| (c) RSS after opening the export and two reads | {int(rss['open'])/1024:.1f} MiB | < 100 MiB |")
else:
    print("| (c) RSS after opening the export | n/a (no NBD server) | < 100 MiB |")
EOF
