#!/usr/bin/env bash
# Export a Docker container's file system into a Wrenn template:
# $WRENN_DIR/images/<name>/rootfs.ext4, with envd, wrenn-init and tini
# injected, shrunk to its minimum plus headroom.
#
# Usage: scripts/rootfs-from-container.sh <container> <name>
# Needs a Docker engine. Without one, use `wrenn-image import` on a
# `docker save` tarball or an OCI layout, or `make rootfs` (debootstrap).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
container=${1:?usage: $0 <container> <name>}
name=${2:?usage: $0 <container> <name>}
wrenn_dir=${WRENN_DIR:-/var/lib/wrenn}
headroom=${HEADROOM:-256M}
tini=${TINI:-/usr/bin/tini-static}
builds=${WRENN_BUILDS:-$repo/builds}

log() { printf '[rootfs-from-container] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root to keep file owners"; exit 1; }
for bin in envd wrenn-init wrenn-image; do
	[ -x "$builds/$bin" ] || { log "missing $builds/$bin: run make build-guest"; exit 1; }
done
[[ "$name" =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]] || { log "invalid template name $name"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/wrenn-export.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree="$work/tree"
mkdir "$tree"

log "exporting container $container"
docker export "$container" | tar -x -p --numeric-owner --xattrs -C "$tree"
[ -f "$tree/etc/passwd" ] || { log "container $container has no /etc/passwd; is it a Linux distribution image?"; exit 1; }

install -D -m 0755 "$builds/envd" "$tree/usr/local/bin/envd"
install -D -m 0755 "$builds/wrenn-init" "$tree/usr/local/bin/wrenn-init"
if [ ! -e "$tree/usr/bin/tini" ]; then
	[ -f "$tini" ] || { log "no tini in the container and no $tini (apt-get install tini)"; exit 1; }
	install -D -m 0755 "$tini" "$tree/usr/bin/tini"
fi
if ! grep -q '^user:' "$tree/etc/passwd"; then
	chroot "$tree" /bin/sh -c 'useradd --create-home user 2>/dev/null || adduser -D user' ||
		log "could not add the 'user' account; set defaultUser in /init"
fi

used_kib=$(du -s --block-size=1K "$tree" | cut -f1)
size_mib=$(( used_kib * 3 / 2 / 1024 + 64 ))
mkfs.ext4 -q -F -L rootfs -E root_owner=0:0 -d "$tree" "$work/rootfs.ext4" "${size_mib}M"
"$builds/wrenn-image" --dir "$wrenn_dir" install --name "$name" --from "$work/rootfs.ext4" --envd "$builds/envd" --source "docker:$container"
"$builds/wrenn-image" --dir "$wrenn_dir" shrink "$name" --headroom "$headroom"
log "template $name ready at $wrenn_dir/images/$name/rootfs.ext4"
