#!/usr/bin/env bash
# Builds the guest side: the static husk-agent, the guest kernel (cached in
# $HUSK_CACHE_DIR, default /var/cache/husk, keyed by config and source) and
# the initramfs (target/husk/initramfs.cpio). Prints shell `export` lines
# for HUSK_KERNEL and HUSK_INITRAMFS on stdout; progress goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

# The agent is PID 1 of an initramfs with no libc: link it statically.
# --target keeps the static flag off build scripts and proc macros.
host_target=$(rustc -vV | sed -n 's/^host: //p')
# libseccomp (for container seccomp profiles) is linked statically too.
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/$(gcc -dumpmachine) \
	RUSTFLAGS="-C target-feature=+crt-static" \
	cargo build --release -p husk-agent --target "$host_target" >&2
agent="target/$host_target/release/husk-agent"

kernel=$(bash guest-kernel/build.sh | tail -n 1)
initramfs=$(bash rootfs/build.sh "$agent" target/husk/initramfs.cpio | tail -n 1)
printf 'export HUSK_KERNEL=%q\nexport HUSK_INITRAMFS=%q\n' "$kernel" "$initramfs"
