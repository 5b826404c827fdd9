#!/usr/bin/env bash
# Rebuild envd and wrenn-init and copy them into an existing image, without
# mounting it (debugfs writes into the ext4 file directly). The template is
# replaced atomically, with a fresh checksum.
#
# Usage: scripts/update-minimal-rootfs.sh [name]     (default name: minimal)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
name=${1:-minimal}
wrenn_dir=${WRENN_DIR:-/var/lib/wrenn}
image="$wrenn_dir/images/$name/rootfs.ext4"
builds=${WRENN_BUILDS:-$repo/builds}

log() { printf '[update-rootfs] %s\n' "$*" >&2; }

[ -f "$image" ] || { log "no image at $image: build it first (make rootfs)"; exit 1; }
# WRENN_BUILDS names prebuilt binaries; otherwise build them now.
[ -n "${WRENN_BUILDS:-}" ] || make -C "$repo" --no-print-directory build-guest >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/wrenn-update.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp --sparse=always "$image" "$work/rootfs.ext4"
for bin in envd wrenn-init; do
	target=/usr/local/bin/$bin
	debugfs -w -f - "$work/rootfs.ext4" >/dev/null 2>"$work/debugfs.err" <<DEBUGFS
rm $target
write $builds/$bin $target
sif $target mode 0100755
sif $target uid 0
sif $target gid 0
DEBUGFS
	# debugfs exits 0 even when a step fails; its banner and "rm" of a missing file are fine.
	if grep -v -e 'File not found by ext2_lookup' -e '^debugfs [0-9]' "$work/debugfs.err" | grep -q .; then
		cat "$work/debugfs.err" >&2
		log "debugfs failed to write $target"
		exit 1
	fi
	log "wrote $target"
done
e2fsck -fy "$work/rootfs.ext4" >/dev/null 2>&1 || [ $? -le 1 ] || { log "image check failed"; exit 1; }
parent=$("$builds/wrenn-image" --dir "$wrenn_dir" show "$name" | sed -n 's/.*"parent": "\(.*\)".*/\1/p')
source=$("$builds/wrenn-image" --dir "$wrenn_dir" show "$name" | sed -n 's/.*"source": "\(.*\)".*/\1/p')
"$builds/wrenn-image" --dir "$wrenn_dir" install --name "$name" --from "$work/rootfs.ext4" \
	--envd "$builds/envd" --source "${source:-debootstrap}" --parent "$parent"
