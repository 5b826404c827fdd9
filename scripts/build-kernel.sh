#!/usr/bin/env bash
# Build the Wrenn guest kernel from Debian's linux-source package with the
# committed microVM config, and install it as $WRENN_DIR/kernels/vmlinux-<version>.
# The build is cached outside the repo, keyed by the source version and the
# config's hash, so a rerun with the same inputs takes seconds.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
fragment="$repo/images/kernel/microvm.config"
src_tar=/usr/src/linux-source-6.1.tar.xz
wrenn_dir=${WRENN_DIR:-/var/lib/wrenn}
cache=${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}
jobs=${JOBS:-$(nproc)}

log() { printf '[kernel] %s\n' "$*" >&2; }

if [ ! -f "$src_tar" ]; then
	log "missing $src_tar: apt-get install linux-source-6.1 bc bison flex libelf-dev libssl-dev"
	exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (echo "$src_version"; cat "$fragment"; cat "$0") | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

if [ ! -f "$out/vmlinux" ]; then
	work="$cache/kernel/build-$key"
	rm -rf "$work"
	mkdir -p "$work"
	log "extracting linux-source $src_version (cache key $key)"
	tar -xf "$src_tar" -C "$work" --strip-components=1
	cd "$work"
	make -s tinyconfig
	scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
	make -s olddefconfig
	# Every line of the fragment that sets an option must have survived.
	missing=0
	while IFS= read -r line; do
		case "$line" in CONFIG_*=*) grep -qx "$line" .config || { log "config did not take: $line"; missing=1; } ;; esac
	done <"$fragment"
	[ "$missing" = 0 ] || exit 1
	start=$(date +%s)
	log "building vmlinux with $jobs jobs (about 10 minutes on 2 cores)"
	make -j"$jobs" vmlinux 2>&1 | grep -E '^\s+(LD|CC) +(vmlinux|init/)|error|Error' >&2 || true
	[ -f vmlinux ] || { log "build failed"; exit 1; }
	log "built in $(( $(date +%s) - start )) s"
	mkdir -p "$out"
	cp vmlinux "$out/vmlinux"
	cp .config "$out/config"
	make -s kernelrelease >"$out/release"
	cd /
	rm -rf "$work"
fi

release=$(cat "$out/release")
# Debian's source reports e.g. 6.1.0; the installed name must be semver.
mkdir -p "$wrenn_dir/kernels"
install -m 0644 "$out/vmlinux" "$wrenn_dir/kernels/vmlinux-$release"
log "installed $wrenn_dir/kernels/vmlinux-$release"
echo "$wrenn_dir/kernels/vmlinux-$release"
