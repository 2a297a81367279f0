#!/usr/bin/env bash
# Boot smoke test of the husk guest kernel under QEMU (TCG): builds a test initramfs whose /init
# is a busybox shell script, boots it on a microvm and checks what a container guest needs.
#
# Usage: guest-kernel/boot-test.sh [--vmlinux PATH] [--runs N] [--cpu MODEL|default]
#                                  [--memory numa|machine] [--rtc on|off]
#
#   --vmlinux  kernel to boot (default: the output of guest-kernel/build.sh, built if needed)
#   --runs     timed boots after the checks (default 5): QEMU start -> first line of /init
#   --cpu      QEMU -cpu model (default max; "default" passes no -cpu)
#   --memory   how the shared memfd guest RAM (needed by vhost-user devices) is attached:
#              "numa" = -numa node,memdev=mem (default), "machine" = -machine memory-backend=mem
#   --rtc      microvm's CMOS RTC (default on). With rtc=off and no kvmclock (always the case
#              under TCG) the kernel's CMOS read spins ~1 s waiting for the update-in-progress
#              bit of a missing RTC ("Unable to read current time from RTC") and the guest clock
#              starts at 1970. Under KVM, kvmclock supplies the wall clock and no CMOS is read.
#
# Checks, each with the guest's answer printed: /proc/cmdline, /sys/bus/virtio/devices (a
# virtio-rng-device is attached), proc/sysfs/devtmpfs/cgroup2 mounts and the cgroup2 controllers,
# virtiofs/overlay/fuse in /proc/filesystems; then `reboot -f` must make QEMU exit by itself
# (reboot=t + -no-reboot). A second boot whose /init exits must panic and make QEMU exit too
# (panic=-1 + -no-reboot). Exit status 0 if everything passed.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(dirname -- "$SCRIPT_DIR")
QEMU=${QEMU:-qemu-system-x86_64}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-60} # seconds; a hung boot fails instead of blocking forever

die() {
	printf 'boot-test: error: %s\n' "$*" >&2
	exit 1
}

vmlinux=""
runs=5
cpu=max
memory=numa
rtc=on
while (($#)); do
	case $1 in
	--vmlinux) vmlinux=${2:?}; shift 2 ;;
	--runs) runs=${2:?}; shift 2 ;;
	--cpu) cpu=${2:?}; shift 2 ;;
	--memory) memory=${2:?}; shift 2 ;;
	--rtc) rtc=${2:?}; shift 2 ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done
[[ $memory == numa || $memory == machine ]] || die "--memory must be numa or machine"
[[ $runs =~ ^[0-9]+$ ]] || die "--runs must be a number"
[[ $rtc == on || $rtc == off ]] || die "--rtc must be on or off"
command -v "$QEMU" >/dev/null || die "$QEMU not found (apt-get install -y qemu-system-x86)"
if [[ -z $vmlinux ]]; then
	vmlinux=$("$SCRIPT_DIR/build.sh" | tail -n 1)
fi
[[ -r $vmlinux ]] || die "no kernel at $vmlinux"

# microvm has no HPET/PM timer to calibrate the TSC against: pass the host TSC rate.
mhz=$(awk -F: '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)
[[ -n $mhz ]] || die "no 'cpu MHz' in /proc/cpuinfo"
tsc_khz=$(awk -v m="$mhz" 'BEGIN { printf "%d", m * 1000 }')

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT

# The test /init (runs as PID 1 under busybox; output goes to the serial console).
cat >"$tmp/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin
echo HUSK-BOOT-MARKER
mount -t proc proc /proc
if grep -qw husk_test=panic /proc/cmdline; then
	echo "HUSK-PANIC-TEST: init exits with status 7"
	exit 7
fi
mount -t sysfs sysfs /sys || echo "FAIL: mount sysfs"
mount -t devtmpfs devtmpfs /dev || echo "FAIL: mount devtmpfs"
echo "cmdline: $(cat /proc/cmdline)"
echo "uptime at init: $(cut -d' ' -f1 /proc/uptime) s"
echo "kernel: $(uname -r) $(uname -v)"
echo "date: $(date -u)"
for d in /sys/bus/virtio/devices/*; do
	[ -e "$d" ] && echo "virtio device: ${d##*/} id=$(cat "$d/device")"
done
if mount -t cgroup2 none /sys/fs/cgroup; then
	echo "cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
else
	echo "FAIL: mount cgroup2"
fi
# Controllers for a child cgroup, as a container runtime sets them up.
if echo "+cpuset +cpu +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control &&
	mkdir /sys/fs/cgroup/c1 && echo $$ >/sys/fs/cgroup/c1/cgroup.procs &&
	echo 64M >/sys/fs/cgroup/c1/memory.max && echo 100 >/sys/fs/cgroup/c1/pids.max &&
	echo "50000 100000" >/sys/fs/cgroup/c1/cpu.max && [ -e /sys/fs/cgroup/c1/cgroup.freeze ]; then
	echo "cgroup2 child with memory.max/pids.max/cpu.max/cgroup.freeze: ok"
	echo $$ >/sys/fs/cgroup/cgroup.procs
else
	echo "FAIL: cgroup2 child setup"
fi
mkdir -p /dev/pts && mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts &&
	[ -c /dev/pts/ptmx ] && echo "devpts: ok" || echo "FAIL: devpts"
grep -q '^Seccomp:' /proc/self/status && echo "seccomp: ok" || echo "FAIL: no seccomp"
for fs in virtiofs overlay fuse tmpfs devtmpfs cgroup2; do
	if grep -qw "$fs" /proc/filesystems; then echo "fs $fs: ok"; else echo "FAIL: fs $fs missing"; fi
done
mount -t tmpfs tmpfs /tmp
mkdir -p /tmp/l /tmp/u /tmp/w /tmp/m && echo lower >/tmp/l/f &&
	mount -t overlay overlay -o lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w /tmp/m &&
	rm /tmp/m/f && [ ! -e /tmp/m/f ] && echo "overlay on tmpfs with whiteout: ok" ||
	echo "FAIL: overlay on tmpfs"
for ns in uts ipc user pid net cgroup mnt time; do
	[ -e /proc/self/ns/$ns ] || echo "FAIL: no $ns namespace"
done
unshare -U -p -n -u -i -m -f -r sh -c 'echo "unshare: uid=$(id -u) pid=$$"' ||
	echo "FAIL: unshare"
echo HUSK-TEST-DONE
reboot -f
EOF
cpio=$("$REPO/rootfs/build.sh" "$tmp/init" "$tmp/test.cpio" --debug | tail -n 1)

# Sets QEMU_CMD to the QEMU command line; $1: extra kernel command-line words.
build_cmd() {
	QEMU_CMD=("$QEMU" -M "microvm,acpi=off,x-option-roms=off,rtc=$rtc" -accel "tcg,thread=multi")
	[[ $cpu == default ]] || QEMU_CMD+=(-cpu "$cpu")
	QEMU_CMD+=(-m 256M -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio)
	# Guest RAM in a shared memfd, so vhost-user backends (virtiofsd, vsock) can map it.
	QEMU_CMD+=(-object "memory-backend-memfd,id=mem,size=256M,share=on")
	if [[ $memory == numa ]]; then
		QEMU_CMD+=(-numa "node,memdev=mem")
	else
		QEMU_CMD[2]+=",memory-backend=mem"
	fi
	QEMU_CMD+=(-device virtio-rng-device)
	QEMU_CMD+=(-kernel "$vmlinux" -initrd "$cpio")
	QEMU_CMD+=(-append "console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=$tsc_khz noapictimer${1:+ $1}")
}

# Runs QEMU_CMD with a deadline; stdout+stderr to $1; sets rc.
run_qemu() {
	rc=0
	timeout "$BOOT_TIMEOUT" "${QEMU_CMD[@]}" </dev/null >"$1" 2>&1 || rc=$?
}

failed=0
check() { # $1: log file, $2: fixed string that must be present, $3: description
	if grep -qF -- "$2" "$1"; then
		printf '  ok    %s\n' "$3"
	else
		printf '  FAIL  %s\n' "$3"
		failed=1
	fi
}

# --- 1. functional boot ---------------------------------------------------------------------------
build_cmd ""
echo "== command line"
for arg in "${QEMU_CMD[@]}"; do
	if [[ $arg == *" "* ]]; then printf "'%s' " "$arg"; else printf '%s ' "$arg"; fi
done
echo
echo "== functional boot"
run_qemu "$tmp/boot.log"
sed 's/^/  | /' "$tmp/boot.log"
check "$tmp/boot.log" HUSK-BOOT-MARKER "/init ran"
check "$tmp/boot.log" "cgroup2 controllers: cpuset cpu memory pids" "cgroup2 mounted, controllers"
check "$tmp/boot.log" "cgroup2 child with" "cgroup2 child limits"
check "$tmp/boot.log" "fs virtiofs: ok" "virtiofs registered"
check "$tmp/boot.log" "fs overlay: ok" "overlay registered"
check "$tmp/boot.log" "fs fuse: ok" "fuse registered"
check "$tmp/boot.log" "virtio device:" "a virtio-mmio device was probed"
check "$tmp/boot.log" HUSK-TEST-DONE "test script completed"
if grep -q FAIL "$tmp/boot.log"; then
	echo "  FAIL  the guest reported failures"
	failed=1
fi
if ((rc == 0)); then
	echo "  ok    QEMU exited by itself after reboot -f (rc 0)"
else
	echo "  FAIL  QEMU rc $rc (124 = still running after ${BOOT_TIMEOUT}s)"
	failed=1
fi

# --- 2. panic boot --------------------------------------------------------------------------------
echo "== panic boot (/init exits)"
build_cmd husk_test=panic
run_qemu "$tmp/panic.log"
sed 's/^/  | /' "$tmp/panic.log"
check "$tmp/panic.log" "Kernel panic" "kernel panicked"
if ((rc == 0)); then
	echo "  ok    QEMU exited by itself after the panic (rc 0)"
else
	echo "  FAIL  QEMU rc $rc (124 = still running after ${BOOT_TIMEOUT}s)"
	failed=1
fi

# --- 3. timing --------------------------------------------------------------------------------------
if ((runs > 0)); then
	echo "== timing: QEMU start -> HUSK-BOOT-MARKER, and -> QEMU exit ($runs runs)"
	build_cmd ""
	marker_ms=()
	exit_ms=()
	for ((i = 1; i <= runs; i++)); do
		start=$EPOCHREALTIME
		seen=""
		while IFS= read -r line; do
			if [[ -z $seen && $line == *HUSK-BOOT-MARKER* ]]; then seen=$EPOCHREALTIME; fi
		done < <(timeout "$BOOT_TIMEOUT" "${QEMU_CMD[@]}" </dev/null 2>&1)
		end=$EPOCHREALTIME
		[[ -n $seen ]] || die "run $i: no marker"
		marker_ms+=("$(awk -v a="$start" -v b="$seen" 'BEGIN { printf "%d", (b - a) * 1000 }')")
		exit_ms+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%d", (b - a) * 1000 }')")
		printf '  run %d: marker %s ms, exit %s ms\n' "$i" "${marker_ms[-1]}" "${exit_ms[-1]}"
	done
	stats() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
		printf "min %d / median %d / max %d ms", v[1], (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR] }'; }
	echo "  to marker: $(stats "${marker_ms[@]}")"
	echo "  to exit:   $(stats "${exit_ms[@]}")"
fi

if ((failed)); then
	echo "== FAILED"
	exit 1
fi
echo "== all checks passed"
