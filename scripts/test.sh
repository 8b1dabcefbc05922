#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what the tests need (Debian
# packages for the real NBD clients and peers), then runs every test.
#
#   scripts/test.sh            # everything
#   scripts/test.sh e2e        # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img  || need_pkgs+=(qemu-utils)
have nbdinfo   || need_pkgs+=(libnbd-bin)
have fio       || need_pkgs+=(fio)
have nbdkit    || need_pkgs+=(nbdkit)
# The VM boot test: qemu-system-x86 (brings qemu-utils 7.2 along), mkfs.ext4; its fixture
# script fetches linux-image-cloud-amd64 and busybox-static with `apt-get download`.
have qemu-system-x86_64 || need_pkgs+=(qemu-system-x86 qemu-utils)
have mkfs.ext4 || need_pkgs+=(e2fsprogs)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# The VM fixture resolves the kernel package from the apt lists: make sure they exist.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  $SUDO apt-get update -q >/dev/null
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_pkgs[*]}" >&2
  $SUDO apt-get install -y --no-install-recommends "${need_pkgs[@]}" \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "${need_pkgs[@]}"; }
fi
# A real S3-compatible server for the store tests.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "test.sh: installing moto[server] (S3 test server) with pip" >&2
  python3 -m pip install --quiet 'moto[server]' \
    || python3 -m pip install --quiet --break-system-packages 'moto[server]'
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
# fio must have its nbd engine (Debian's fio is built with libnbd).
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
  echo "test.sh: this fio has no nbd engine; the fio tests will fail" >&2
fi

cargo fmt --all -- --check
cargo test --locked "$@"
