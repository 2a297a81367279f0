#!/usr/bin/env bash
# husk-vmm on a machine with hardware KVM, from binaries packed by
# scripts/device-pack.sh into .dev/ (the machine needs no Rust or QEMU).
# Prints the host's virtualization, runs the husk-vmm Linux boot tests (with
# and without a virtio-fs share served by the packed virtiofsd), the virtio-fs
# device tests and the boot benchmark's husk-vmm rows.
# Usage: bash scripts/device-kvm.sh [runs]
set -u
d=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.dev" && pwd -P)
echo "== host: $(uname -r), $(nproc) cpus"
ls -l /dev/kvm 2>&1
echo "cpu virt flag: $(grep -m1 -o -w -E 'vmx|svm' /proc/cpuinfo || echo none)"
ls -d /sys/module/kvm* 2>&1
[ -c /dev/kvm ] || { echo "no /dev/kvm here: nothing to run"; exit 0; }
export HUSK_KERNEL=$d/vmlinux HUSK_INITRAMFS=$d/initramfs.cpio HUSK_VMM=$d/husk-vmm
export HUSK_RUN_DIR=/tmp/husk-run
export HUSK_VIRTIOFSD=$d/virtiofsd LD_LIBRARY_PATH=$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
rc=0
echo "== kvm_linux_boot"
"$d/kvm_linux_boot" --nocapture --test-threads=1 || rc=1
echo "== kvm_lifecycle"
"$d/kvm_lifecycle" --nocapture --test-threads=1 || rc=1
echo "== virtio-fs: device against virtiofsd, tiny KVM guest"
"$d/virtio_fs" --nocapture --test-threads=1 || rc=1
"$d/kvm_virtio_fs" --nocapture --test-threads=1 || rc=1
echo "== husk-tests boot (husk-vmm backend, with and without a shared dir)"
"$d/boot" --nocapture husk_vmm || rc=1
echo "== bench: husk-vmm rows"
HUSK_BENCH_BACKENDS=husk-vmm "$d/husk-bench-boot" "${1:-20}" || rc=1
echo "== console of the last boot"
find /tmp -name console.log -newer "$d/husk-vmm" 2>/dev/null | head -1 | xargs -r tail -5
exit $rc
