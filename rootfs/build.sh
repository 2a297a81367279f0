#!/usr/bin/env bash
# Build the husk guest initramfs: a reproducible newc cpio whose /init is the husk agent.
#
# Usage: rootfs/build.sh <static-husk-agent> <output.cpio> [--debug] [--gzip]
#
#   --debug  also add busybox-static as /bin/busybox plus a /bin/<applet> symlink for every
#            applet (a shell etc. for debugging inside the guest).
#   --gzip   gzip the archive (gzip -n -9; the guest kernel has RD_GZIP). The default is an
#            uncompressed archive: the kernel then only copies it, which is faster to boot
#            than inflating it (~125 ms per MB of gzip under QEMU TCG), and the file is small.
#
# Identical inputs give a byte-identical archive: entries are written in a fixed order by
# rootfs/mkcpio.py, all owned by 0:0, with mtime $SOURCE_DATE_EPOCH (default 0), and nothing
# needs root (device nodes are written into the archive, not created with mknod).
#
# The archive holds only what the kernel needs before the agent runs: /dev/console (the kernel
# opens it as PID 1's stdin/stdout/stderr before anything is mounted) and /dev/null, plus empty
# mount points. The agent mounts proc, sysfs, devtmpfs (CONFIG_DEVTMPFS_MOUNT does not apply to
# an initramfs root), cgroup2 at /sys/fs/cgroup (that directory comes from sysfs itself, so it
# is not in the archive), tmpfs on /run and /tmp.
#
# The last line on stdout is the absolute path of the archive; messages go to stderr.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
MKCPIO="$SCRIPT_DIR/mkcpio.py"
BUSYBOX=${BUSYBOX:-/bin/busybox} # Debian busybox-static installs a static /bin/busybox

usage() {
	printf 'usage: %s <static-husk-agent> <output.cpio> [--debug] [--gzip]\n' "$0" >&2
	exit 2
}
die() {
	printf 'rootfs: error: %s\n' "$*" >&2
	exit 1
}

debug=0
gzip=0
positional=()
for arg in "$@"; do
	case $arg in
	--debug) debug=1 ;;
	--gzip) gzip=1 ;;
	-h | --help) usage ;;
	-*) usage ;;
	*) positional+=("$arg") ;;
	esac
done
((${#positional[@]} == 2)) || usage
agent=${positional[0]}
output=${positional[1]}

command -v python3 >/dev/null || die "python3 is required (apt-get install -y python3)"
[[ -f $agent && -r $agent ]] || die "agent binary not found: $agent"

# Fail early on a binary that cannot run in an initramfs without a libc: a dynamically linked
# ELF has a PT_INTERP program header. (A "#!" script is accepted, e.g. for boot tests.)
is_dynamic() {
	command -v readelf >/dev/null || return 1
	readelf -lW -- "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}
if is_dynamic "$agent"; then
	die "$agent is dynamically linked; the initramfs has no libc (build it static, e.g. musl)"
fi

if ((debug)); then
	[[ -x $BUSYBOX ]] || die "$BUSYBOX not found (apt-get install -y busybox-static)"
	if is_dynamic "$BUSYBOX"; then
		die "$BUSYBOX is dynamically linked; install busybox-static"
	fi
fi

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
abs() { printf '%s/%s\n' "$(cd -- "$(dirname -- "$1")" && pwd -P)" "$(basename -- "$1")"; }
agent=$(abs "$agent")
mkdir -p -- "$(dirname -- "$output")"
output=$(abs "$output")

tmpdir=$(mktemp -d)
trap 'rm -rf -- "$tmpdir"' EXIT
spec="$tmpdir/spec"

# The spec (gen_init_cpio style, see mkcpio.py). Order matters: parents before children.
{
	cat <<EOF
dir dev 0755 0 0
nod dev/console 0600 0 0 c 5 1
nod dev/null 0666 0 0 c 1 3
dir proc 0555 0 0
dir sys 0555 0 0
dir run 0755 0 0
dir tmp 1777 0 0
file init $agent 0755 0 0
EOF
	if ((debug)); then
		printf 'dir bin 0755 0 0\n'
		printf 'file bin/busybox %s 0755 0 0\n' "$(abs "$BUSYBOX")"
		# One symlink per applet, sorted so the order does not depend on busybox's listing.
		"$BUSYBOX" --list | LC_ALL=C sort -u | while read -r applet; do
			if [[ -n $applet && $applet != busybox ]]; then
				printf 'slink bin/%s busybox 0777 0 0\n' "$applet"
			fi
		done
	fi
} >"$spec"

python3 "$MKCPIO" "$spec" "$tmpdir/initramfs.cpio"
if ((gzip)); then
	# -n: no file name or timestamp in the gzip header, so the output stays reproducible.
	gzip -n -9 <"$tmpdir/initramfs.cpio" >"$tmpdir/initramfs.out"
else
	mv -- "$tmpdir/initramfs.cpio" "$tmpdir/initramfs.out"
fi

# Atomic replace: never leave a half-written archive at $output.
cp -- "$tmpdir/initramfs.out" "$output.tmp.$$"
mv -f -- "$output.tmp.$$" "$output"
printf 'rootfs: wrote %s (%s bytes%s%s)\n' "$output" "$(stat -c %s "$output")" \
	"$( ((debug)) && printf ', debug')" "$( ((gzip)) && printf ', gzip')" >&2
printf '%s\n' "$output"
