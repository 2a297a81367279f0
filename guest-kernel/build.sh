#!/usr/bin/env bash
# Build (or fetch from the cache) the husk guest kernel: an uncompressed ELF vmlinux with a PVH
# entry point, configured as `make tinyconfig` + guest-kernel/husk.config.
#
# Usage: guest-kernel/build.sh
#
# Cache: ${HUSK_CACHE_DIR:-/var/cache/husk}/kernel/<key>/{vmlinux,config}, where <key> is a
# sha256 over husk.config, this script and the installed linux-source-6.1 package version.
# ${HUSK_CACHE_DIR:-/var/cache/husk}/vmlinux is a symlink to the vmlinux of the current key.
#
# Output: progress goes to stderr; the last line on stdout is the absolute path of vmlinux.
#
# Safe to rerun after an interruption: the key dir only gets `vmlinux` (by rename) once the build
# is complete; a half-extracted tree is discarded; a half-built tree is resumed, and if that
# resumed build fails it is discarded and rebuilt once from a clean tree. Concurrent runs for the
# same key serialise on a lock.
set -euo pipefail

SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC_TOPDIR=linux-source-6.1 # top-level directory inside the tarball

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
SELF="$SCRIPT_DIR/$(basename -- "${BASH_SOURCE[0]}")"
FRAGMENT="$SCRIPT_DIR/husk.config"
CACHE_ROOT=${HUSK_CACHE_DIR:-/var/cache/husk}

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() {
	printf 'guest-kernel: error: %s\n' "$*" >&2
	exit 1
}

# --- Build dependencies ---------------------------------------------------------------------------
check_deps() {
	local missing=() cmd pkg
	# command:apt-package
	for pair in make:make gcc:gcc ld:binutils flex:flex bison:bison bc:bc perl:perl \
		xz:xz-utils tar:tar sha256sum:coreutils flock:util-linux dpkg-query:dpkg; do
		cmd=${pair%%:*}
		pkg=${pair#*:}
		command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
	done
	# Headers needed by host tools: objtool (libelf), scripts/sign-file & extract-cert (openssl).
	[[ -e /usr/include/libelf.h || -e /usr/include/libelf/libelf.h ]] || missing+=(libelf-dev)
	[[ -e /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
	[[ -r $SRC_TARBALL ]] || missing+=("$SRC_PKG")
	if ((${#missing[@]})); then
		die "missing build dependencies; install them with:
    apt-get install -y build-essential ${missing[*]}"
	fi
}

check_deps
[[ -r $FRAGMENT ]] || die "config fragment not found: $FRAGMENT"
SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null) ||
	die "package $SRC_PKG is not installed (apt-get install -y $SRC_PKG)"
[[ -n $SRC_VERSION ]] || die "package $SRC_PKG is not installed (apt-get install -y $SRC_PKG)"

# --- Cache key ----------------------------------------------------------------------------------------
# Hash the *contents* (not the paths) of the inputs, so the key is the same in every clone.
KEY=$(
	{
		printf 'husk.config %s\n' "$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)"
		printf 'build.sh %s\n' "$(sha256sum <"$SELF" | cut -d' ' -f1)"
		printf '%s %s\n' "$SRC_PKG" "$SRC_VERSION"
	} | sha256sum | cut -c1-16
)
KEY_DIR="$CACHE_ROOT/kernel/$KEY"
VMLINUX="$KEY_DIR/vmlinux"
LINK="$CACHE_ROOT/vmlinux"

# Point $CACHE_ROOT/vmlinux at this key's vmlinux (atomic: new symlink, then rename over).
update_link() {
	local tmp
	if [[ $(readlink -- "$LINK" 2>/dev/null || true) == "$VMLINUX" ]]; then return 0; fi
	tmp="$LINK.tmp.$$"
	ln -sfn -- "$VMLINUX" "$tmp"
	mv -fT -- "$tmp" "$LINK"
}

if [[ -f $VMLINUX ]]; then
	log "cached: $VMLINUX (key $KEY)"
	update_link
	printf '%s\n' "$VMLINUX"
	exit 0
fi

mkdir -p -- "$KEY_DIR"
# Serialise concurrent builds of the same key; the second one finds vmlinux once it gets the lock.
exec 9>"$KEY_DIR/.lock"
if ! flock -n 9; then
	log "another build of key $KEY is running; waiting for it"
	flock 9
fi
if [[ -f $VMLINUX ]]; then
	log "built by a concurrent run: $VMLINUX"
	update_link
	printf '%s\n' "$VMLINUX"
	exit 0
fi

BUILD_DIR="$KEY_DIR/build"
SRC="$BUILD_DIR/$SRC_TOPDIR"
EXTRACTED_MARK="$BUILD_DIR/.extracted"
JOBS=$(nproc)
rm -f -- "$KEY_DIR"/*.tmp.* # left by a run killed while publishing

# The extracted and built tree needs ~2 GB.
avail_kb=$(df -Pk -- "$KEY_DIR" | awk 'NR == 2 { print $4 }')
if ((avail_kb < 3 * 1024 * 1024)); then
	log "warning: only $((avail_kb / 1024)) MiB free under $KEY_DIR; the build needs ~2 GiB"
fi

# Keep the caller's environment out of Kbuild: a make jobserver inherited from cargo or an outer
# make, an output directory, extra compiler flags or a cross toolchain would change the result
# (or break the build) without changing the cache key.
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES GNUMAKEFLAGS KBUILD_OUTPUT KCONFIG_CONFIG \
	KCFLAGS KCPPFLAGS KAFLAGS KRUSTFLAGS CROSS_COMPILE LLVM O W C V
# Make the build reproducible (same inputs, any build path: byte-identical vmlinux): fixed
# user/host/build number, and a timestamp taken from the source tarball (dpkg keeps its mtime).
# The timestamp must be a date `date -d` parses: usr/gen_initramfs.sh also uses it as the mtime
# of the built-in initramfs, and falls back to the current time otherwise.
export KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk KBUILD_BUILD_VERSION=1
KBUILD_BUILD_TIMESTAMP=$(date -u -d "@$(stat -c %Y -- "$SRC_TARBALL")" '+%Y-%m-%d %H:%M:%S UTC')
export KBUILD_BUILD_TIMESTAMP

extract() {
	rm -rf -- "$BUILD_DIR"
	mkdir -p -- "$BUILD_DIR"
	log "extracting $SRC_TARBALL into $BUILD_DIR"
	tar -xJf "$SRC_TARBALL" -C "$BUILD_DIR" --no-same-owner
	[[ -f $SRC/Makefile ]] || die "unexpected tarball layout: no $SRC_TOPDIR/Makefile"
	: >"$EXTRACTED_MARK"
}

configure() {
	local kmake=(make -C "$SRC" ARCH=x86_64)
	log "make tinyconfig + merge $FRAGMENT + olddefconfig"
	"${kmake[@]}" tinyconfig >&2
	(cd "$SRC" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") >&2
	"${kmake[@]}" olddefconfig >&2

	# Every option the fragment sets must have survived (Kconfig silently drops options whose
	# dependencies are unmet), and every option it switches off must really be off.
	local opt dropped=() enabled=()
	while read -r opt; do
		if ! grep -qx -- "$opt=y" "$SRC/.config"; then dropped+=("$opt"); fi
	done < <(sed -nE 's/^(CONFIG_[A-Za-z0-9_]+)=y[[:space:]]*$/\1/p' "$FRAGMENT")
	while read -r opt; do
		if grep -q -- "^$opt=" "$SRC/.config"; then enabled+=("$opt"); fi
	done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set[[:space:]]*$/\1/p' "$FRAGMENT")
	if ((${#dropped[@]} || ${#enabled[@]})); then
		if ((${#dropped[@]})); then
			log "options set =y in husk.config but missing from .config (unmet dependencies?):"
			printf '    %s\n' "${dropped[@]}" >&2
		fi
		if ((${#enabled[@]})); then
			log "options disabled in husk.config but enabled in .config (selected by something?):"
			printf '    %s\n' "${enabled[@]}" >&2
		fi
		cp -- "$SRC/.config" "$KEY_DIR/config.rejected"
		rm -rf -- "$BUILD_DIR"
		die "husk.config did not apply cleanly; the resulting config is $KEY_DIR/config.rejected"
	fi
}

build() {
	log "make -j$JOBS vmlinux (several minutes; longer on a loaded machine)"
	make -C "$SRC" ARCH=x86_64 -j"$JOBS" vmlinux >&2
}

start=$SECONDS
resumed=0
if [[ -f $EXTRACTED_MARK && -f $SRC/Makefile ]]; then
	log "resuming the build tree left by an interrupted run: $BUILD_DIR"
	resumed=1
else
	extract
fi
configure
if ! build; then
	if ((!resumed)); then
		rm -rf -- "$BUILD_DIR"
		die "kernel build failed (log above)"
	fi
	# A run killed mid-compile may have left truncated objects behind; start over once.
	log "resumed build failed; retrying from a freshly extracted tree"
	extract
	configure
	if ! build; then
		rm -rf -- "$BUILD_DIR"
		die "kernel build failed (log above)"
	fi
fi

# Publish atomically: config first, vmlinux last (its presence means "done").
cp -- "$SRC/.config" "$KEY_DIR/config.tmp.$$"
mv -f -- "$KEY_DIR/config.tmp.$$" "$KEY_DIR/config"
cp -- "$SRC/vmlinux" "$KEY_DIR/vmlinux.tmp.$$"
mv -f -- "$KEY_DIR/vmlinux.tmp.$$" "$VMLINUX"
log "built $VMLINUX ($(stat -c %s "$VMLINUX") bytes) in $((SECONDS - start)) s"

# The extracted tree is ~1.5 GB before building; drop it.
rm -rf -- "$BUILD_DIR"
update_link

# Drop build trees that interrupted runs left for other keys (they would only be resumed if
# that exact husk.config/build.sh came back), unless a build of that key is running right now.
for other in "$CACHE_ROOT"/kernel/*/build; do
	[[ -d $other ]] || continue
	other_key_dir=${other%/build}
	[[ $other_key_dir == "$KEY_DIR" ]] && continue
	if flock -n "$other_key_dir/.lock" true 2>/dev/null; then
		log "removing stale build tree $other"
		rm -rf -- "$other"
	fi
done
printf '%s\n' "$VMLINUX"
