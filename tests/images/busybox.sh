#!/usr/bin/env bash
# Builds an OCI image layout holding a busybox image, offline (umoci +
# busybox-static): /bin/busybox plus a symlink per applet, tag `latest`.
# Usage: tests/images/busybox.sh <layout-dir>. Reuses an existing layout.
set -euo pipefail
out=${1:?usage: busybox.sh <layout-dir>}
if [[ -f $out/index.json ]] && [[ -f $out/.husk-complete ]]; then
	echo "$out"
	exit 0
fi
busybox=${BUSYBOX:-/bin/busybox}
for t in umoci "$busybox"; do
	command -v "$t" >/dev/null || { echo "busybox.sh: $t missing (apt-get install umoci busybox-static)" >&2; exit 1; }
done
# Built beside the target and renamed into place, so a reader never sees a
# half-written layout.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
final=$out
out="$tmp/layout"
umoci init --layout "$out" >&2
umoci new --image "$out:latest" >&2
umoci unpack --image "$out:latest" "$tmp/b" >&2
root="$tmp/b/rootfs"
mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root}
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
	[[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
umoci repack --image "$out:latest" "$tmp/b" >&2
umoci config --image "$out:latest" --config.cmd sh --config.env PATH=/bin:/usr/bin >&2
touch "$out/.husk-complete"
mkdir -p "$(dirname "$final")"
rm -rf "$final"
mv "$out" "$final"
echo "$final"
