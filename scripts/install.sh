#!/usr/bin/env bash
# Installs husk for containerd (`make install` runs this; README, "Install
# for containerd"):
#   binaries  husk, containerd-shim-husk-v2, husk-vsock (and husk-vmm if
#             built) into $PREFIX/bin (default /usr/local/bin)
#   guest     vmlinux and initramfs.cpio into $HUSK_DATA_DIR (default
#             /usr/share/husk)
#   config    $HUSK_CONF_DIR/config.toml (default /etc/husk), only if absent
# then prints the stanza to add to containerd's config. Everything goes
# under $DESTDIR when set (staging; paths written into the config do not
# include it). Binaries come from $HUSK_BIN_DIR (default target/release),
# the kernel from $HUSK_KERNEL (default /var/cache/husk/vmlinux), the
# initramfs from $HUSK_INITRAMFS (default target/husk/initramfs.cpio):
# `make` builds them all.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

prefix=${PREFIX:-/usr/local}
destdir=${DESTDIR:-}
data=${HUSK_DATA_DIR:-/usr/share/husk}
conf=${HUSK_CONF_DIR:-/etc/husk}
bins=${HUSK_BIN_DIR:-target/release}
kernel=${HUSK_KERNEL:-/var/cache/husk/vmlinux}
initramfs=${HUSK_INITRAMFS:-target/husk/initramfs.cpio}

die() {
	echo "install: $*" >&2
	exit 1
}

for b in husk containerd-shim-husk-v2 husk-vsock; do
	[ -x "$bins/$b" ] || die "$bins/$b is missing: run \`make\` (or cargo build --release --bins) first"
done
[ -f "$kernel" ] || die "guest kernel $kernel is missing: run \`make\` (or scripts/build-guest.sh) first"
[ -f "$initramfs" ] || die "initramfs $initramfs is missing: run \`make\` (or scripts/build-guest.sh) first"

for b in husk containerd-shim-husk-v2 husk-vsock husk-vmm; do
	if [ -x "$bins/$b" ]; then
		install -D -m 0755 "$bins/$b" "$destdir$prefix/bin/$b"
		echo "installed $prefix/bin/$b" >&2
	fi
done
install -D -m 0644 "$(readlink -f "$kernel")" "$destdir$data/vmlinux"
install -D -m 0644 "$initramfs" "$destdir$data/initramfs.cpio"
echo "installed $data/vmlinux, $data/initramfs.cpio" >&2

# containerd (under systemd) runs shims with a short PATH and often no
# HOME: name virtiofsd by its full path when it is found.
virtiofsd=$(command -v virtiofsd || true)
for c in "${HOME:-/root}/.cargo/bin/virtiofsd" /usr/libexec/virtiofsd; do
	[ -n "$virtiofsd" ] || { [ -x "$c" ] && virtiofsd=$c; } || true
done

config="$destdir$conf/config.toml"
if [ -e "$config" ]; then
	echo "kept $conf/config.toml (exists)" >&2
else
	install -d "$destdir$conf"
	{
		echo "# husk runtime configuration (containerd-shim-husk-v2). Every key is"
		echo "# optional; HUSK_* environment variables override these, pod"
		echo "# annotations io.husk.vcpus / io.husk.memory_mib override the sizes."
		echo "kernel = \"$data/vmlinux\""
		echo "initramfs = \"$data/initramfs.cpio\""
		echo "# auto, qemu-kvm, qemu-tcg or husk-vmm"
		echo "backend = \"auto\""
		echo "default_vcpus = 1"
		echo "default_memory_mib = 256"
		echo "# guest kernel and agent at debug level, console copied into the shim log"
		echo "debug_console = false"
		if [ -n "$virtiofsd" ]; then
			echo "virtiofsd = \"$virtiofsd\""
		else
			echo "# virtiofsd = \"/usr/libexec/virtiofsd\"  (not found: cargo install virtiofsd)"
		fi
	} >"$config"
	echo "wrote $conf/config.toml" >&2
fi

cat <<STANZA
# Add to containerd's config (/etc/containerd/config.toml, version = 2),
# then restart containerd:
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]
    ConfigPath = "$conf/config.toml"
# Without the CRI plugin: ctr run --runtime io.containerd.husk.v2 ...
STANZA
