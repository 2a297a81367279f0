#!/usr/bin/env bash
# Installs the Debian packages husk builds and tests with (only those that
# are missing, so a second run is quick). Needs root (or sudo).
set -euo pipefail

pkgs=(
	qemu-system-x86     # the VMM of the QEMU backend (KVM or TCG)
	linux-source-6.1    # guest kernel source (guest-kernel/build.sh)
	build-essential bc flex bison libelf-dev libssl-dev # kernel build
	busybox-static      # debug initramfs and misbehaving test guests
	cpio xz-utils python3 # initramfs and source unpacking
	libseccomp-dev      # seccomp in the guest agent (linked statically)
	libcap-ng-dev pkg-config # building virtiofsd
	umoci               # offline OCI images for tests
	containerd          # the containerd shim tests (brings runc and ctr)
	containernetworking-plugins # CNI bridge for the CRI pod network test (shim-v2/tests/cri.rs)
	protobuf-compiler   # protoc, for the CRI client of shim-v2/tests/cri.rs (k8s-cri)
	podman conmon       # the podman end-to-end tests (tests/tests/podman.rs)
)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps: installing ${missing[*]}" >&2
	sudo=
	[[ $(id -u) == 0 ]] || sudo=sudo
	$sudo apt-get update -q >&2
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
command -v cargo >/dev/null || {
	echo "deps: cargo not found: install Rust (https://rustup.rs) first" >&2
	exit 1
}
# virtiofsd (virtio-fs daemon) comes from crates.io.
if ! command -v virtiofsd >/dev/null && [[ ! -x ${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd ]]; then
	echo "deps: cargo install virtiofsd" >&2
	cargo install --locked virtiofsd >&2
fi
