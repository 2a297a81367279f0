#!/usr/bin/env bash
# One command from a fresh machine to a VM: installs dependencies, builds
# husk, the guest kernel and initramfs, installs the boot artifacts into
# $HUSK_CACHE_DIR (default /var/cache/husk), then boots a sandbox VM,
# prints its agent's Version and runs a busybox container in it
# (`husk check --boot --bundle ...`). Needs root (mounts for virtio-fs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

bash scripts/deps.sh
cargo build --release --bins
eval "$(bash scripts/build-guest.sh)"
cache=${HUSK_CACHE_DIR:-/var/cache/husk}
install -D -m 0644 "$HUSK_INITRAMFS" "$cache/initramfs.cpio"
echo "setup: kernel $HUSK_KERNEL, initramfs $cache/initramfs.cpio" >&2
# A busybox OCI bundle, built offline (umoci + busybox-static).
layout=$(bash tests/images/busybox.sh target/husk/busybox-oci | tail -n 1)
bundle=target/husk/demo-bundle
rm -rf "$bundle"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
python3 - "$bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c", "echo hello from a container in a husk VM: $(uname -r)"]
json.dump(c, open(p, "w"))
PY
exec target/release/husk check --boot --bundle "$bundle"
