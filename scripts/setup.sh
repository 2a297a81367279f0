#!/usr/bin/env bash
# One command from a fresh machine to a VM: installs dependencies, builds
# husk, the guest kernel and initramfs, installs the boot artifacts into
# $HUSK_CACHE_DIR (default /var/cache/husk), then boots a sandbox VM and
# prints its agent's Version (`husk check --boot`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

bash scripts/deps.sh
cargo build --release --bins
eval "$(bash scripts/build-guest.sh)"
cache=${HUSK_CACHE_DIR:-/var/cache/husk}
install -D -m 0644 "$HUSK_INITRAMFS" "$cache/initramfs.cpio"
echo "setup: kernel $HUSK_KERNEL, initramfs $cache/initramfs.cpio" >&2
exec target/release/husk check --boot
