#!/usr/bin/env bash
# Packs what scripts/device-kvm.sh needs into .dev/ (git-ignored): release
# husk-vmm, husk-vsock, the boot benchmark and test binaries, the guest
# kernel and initramfs, and virtiofsd with the two libraries it links
# (libseccomp, libcap-ng) in .dev/lib. Run here, then carry .dev to the
# device machine.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"
eval "$(bash scripts/build-guest.sh)"
cargo build --release -p husk-vmm -p husk-tests --bins >&2
tests=$(cargo test --release -p husk-vmm -p husk-tests --no-run \
  --test kvm_linux_boot --test kvm_lifecycle --test kvm_virtio_fs --test virtio_fs --test boot \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["target"]["name"], m["executable"])')
rm -rf .dev && mkdir .dev
while read -r name exe; do cp "$exe" ".dev/$name"; done <<<"$tests"
cp target/release/{husk-vmm,husk-vsock,husk-bench-boot} .dev/
strip .dev/* 2>/dev/null || true
fsd=${HUSK_VIRTIOFSD:-$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")}
cp "$fsd" .dev/virtiofsd
mkdir .dev/lib
ldd "$fsd" | awk '/libseccomp|libcap-ng/ {print $3}' | xargs -r -I{} cp -L {} .dev/lib/
cp -L "$HUSK_KERNEL" .dev/vmlinux
cp "$HUSK_INITRAMFS" .dev/initramfs.cpio
du -sh .dev >&2
ls -la .dev >&2
