#!/usr/bin/env bash
# Long crash run of volumes at the daemon level: ROUNDS (default 1000) SIGKILLs of the daemon
# while qemu-io writes with FUA and flushes; every acknowledged write must read back after the
# restart, and the image must stay untouched.
#
#   scripts/crash-rounds.sh [ROUNDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
CRASH_ROUNDS=${1:-1000} CRASH_SEED=${2:-1} \
  cargo test --release --test e2e_volume_crash -- --nocapture
