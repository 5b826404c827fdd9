#!/usr/bin/env bash
# Build a guest image from Debian packages with debootstrap (no Docker
# needed) and install it as $WRENN_DIR/images/<name>/rootfs.ext4:
#   minimal  the tools envd and the sandbox account need, nothing more;
#   base     minimal plus what people work with: Python 3 with pip and venv,
#            Node.js and npm, git, build tools and the usual command-line
#            tools (E2B's "base" template stands for it).
#
# Two cache levels, outside the repo: the debootstrapped tree (slow: network
# and dpkg) is keyed by the package list and this script; the final image is
# keyed by that plus the envd and wrenn-init binaries, so changing envd only
# re-assembles the image (seconds), it does not debootstrap again.
#
# Usage: scripts/build-rootfs.sh [minimal|base]     (default: minimal)
# Needs: root, debootstrap, e2fsprogs; builds/envd, builds/wrenn-init and
# builds/wrenn-image (make build-guest).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
name=${1:-minimal}
wrenn_dir=${WRENN_DIR:-/var/lib/wrenn}
cache=${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}
suite=bookworm
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
packages=socat,chrony,tini,sudo,wget,curl,ca-certificates,iproute2,procps,netbase,less,git
# What base adds, installed with apt inside the tree (debootstrap's own
# resolver is not made for a list this long).
extra=""
base_extra="python3 python3-pip python3-venv python3-dev nodejs npm git build-essential pkg-config
	jq unzip zip xz-utils bzip2 file openssh-client rsync vim-tiny nano htop tree lsof
	iputils-ping bind9-dnsutils netcat-openbsd sqlite3"
case "$name" in
minimal) ;;
base) extra=$base_extra ;;
code-runner-beta)
	# base and a Jupyter server with a Python kernel on port 8888, what
	# upstream Wrenn's code interpreter talks to (kernels API, channels).
	extra="$base_extra python3-jupyter-server python3-ipykernel python3-numpy python3-pandas python3-matplotlib"
	;;
*) printf '[rootfs] unknown image %s: use minimal, base or code-runner-beta\n' "$name" >&2; exit 1 ;;
esac
builds=${WRENN_BUILDS:-$repo/builds}

log() { printf '[rootfs] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap and file ownership)"; exit 1; }
for bin in envd wrenn-init wrenn-image; do
	[ -x "$builds/$bin" ] || { log "missing $builds/$bin: run make build-guest"; exit 1; }
done
command -v debootstrap >/dev/null || { log "missing debootstrap: apt-get install debootstrap"; exit 1; }

base_key=$( (echo "$suite $packages $extra"; sed -n '/^# --- base tree ---/,/^# --- end base tree ---/p' "$0") | sha256sum | cut -c1-16)
base="$cache/rootfs/tree-$name-$base_key.tar"

# --- base tree ---
if [ ! -f "$base" ]; then
	work=$(mktemp -d "${TMPDIR:-/tmp}/wrenn-rootfs.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	tree="$work/tree"
	log "debootstrap $suite from $mirror (a few minutes; cached as $base)"
	debootstrap --variant=minbase --include="$packages" "$suite" "$tree" "$mirror" >"$work/debootstrap.log" 2>&1 || {
		tail -20 "$work/debootstrap.log" >&2
		log "debootstrap failed (full log above)"
		exit 1
	}
	if [ -n "$extra" ]; then
		log "installing $(echo $extra | wc -w) more packages with apt"
		echo "deb $mirror $suite main" >"$tree/etc/apt/sources.list"
		mount -t proc proc "$tree/proc"
		mount --bind /dev "$tree/dev"
		trap 'umount "$work/tree/dev" "$work/tree/proc" 2>/dev/null; rm -rf "$work"' EXIT
		# shellcheck disable=SC2086 # the list is words on purpose
		if ! chroot "$tree" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C sh -c \
			"apt-get update -q && apt-get install -y -q --no-install-recommends $(echo $extra)" >"$work/apt.log" 2>&1; then
			tail -30 "$work/apt.log" >&2
			log "apt-get install failed (log above)"
			exit 1
		fi
		umount "$tree/dev" "$tree/proc"
		trap 'rm -rf "$work"' EXIT
		# pip installs for the user as people expect of a sandbox (Debian
		# reserves the system Python for its own packages otherwise).
		rm -f "$tree"/usr/lib/python3*/EXTERNALLY-MANAGED
		ln -sf /usr/bin/python3 "$tree/usr/local/bin/python"
		ln -sf /usr/bin/pip3 "$tree/usr/local/bin/pip"
	fi
	# The sandbox account: passwordless sudo, as users of E2B-style sandboxes expect.
	chroot "$tree" useradd --create-home --shell /bin/bash --groups sudo user
	echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' >"$tree/etc/sudoers.d/wrenn-user"
	chmod 0440 "$tree/etc/sudoers.d/wrenn-user"
	# chrony follows the KVM PTP clock when the host offers one.
	cat >"$tree/etc/chrony/chrony.conf" <<'CHRONY'
# Wrenn guest: follow the host's clock through the KVM PTP device.
refclock PHC /dev/ptp0 poll 2 dpoll -2 offset 0 stratum 2
makestep 1 -1
driftfile /var/lib/chrony/chrony.drift
CHRONY
	echo wrenn >"$tree/etc/hostname"
	: >"$tree/etc/fstab"
	# Nothing in the image needs these; they only make it bigger.
	chroot "$tree" apt-get clean
	rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/usr/share/doc/* \
		"$tree"/usr/share/man/* "$tree"/usr/share/info/* "$tree"/var/log/*.log "$tree"/usr/share/locale/*
	mkdir -p "$cache/rootfs"
	tar --numeric-owner --xattrs -C "$tree" -cf "$base.tmp" .
	mv "$base.tmp" "$base"
	rm -rf "$work"
	trap - EXIT
fi
# --- end base tree ---

image_key=$( (echo "$base_key"; sha256sum "$builds/envd" "$builds/wrenn-init" | cut -d' ' -f1; sed -n '/^# --- image ---/,$p' "$0") | sha256sum | cut -c1-16)
cached_image="$cache/rootfs/$name-$image_key.ext4"

# --- image ---
if [ ! -f "$cached_image" ]; then
	work=$(mktemp -d "${TMPDIR:-/tmp}/wrenn-rootfs.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	tree="$work/tree"
	mkdir "$tree"
	tar --numeric-owner --xattrs -C "$tree" -xf "$base"
	install -m 0755 "$builds/envd" "$tree/usr/local/bin/envd"
	install -m 0755 "$builds/wrenn-init" "$tree/usr/local/bin/wrenn-init"
	if [ "$name" = code-runner-beta ]; then
		# wrenn-init starts /etc/wrenn/start at boot; a memory template of
		# the image is saved once /etc/wrenn/ready passes: with the server
		# up and one idle kernel, which the code interpreter takes first.
		mkdir -p "$tree/etc/wrenn"
		cat >"$tree/etc/wrenn/start" <<'START'
#!/bin/sh
# Jupyter for code interpreters, on 8888: no token of its own (the
# control plane's ingress admits only the capsule's team, unless the
# capsule is public), one kernel started ahead.
python3 -m jupyter_server --ip=0.0.0.0 --port=8888 --no-browser --allow-root \
	--ServerApp.token= --ServerApp.password= --ServerApp.disable_check_xsrf=True \
	--ServerApp.allow_origin='*' --ServerApp.root_dir=/root &
server=$!
until curl -fs -o /dev/null http://127.0.0.1:8888/api; do
	kill -0 "$server" 2>/dev/null || exit 1
	sleep 0.5
done
curl -fsS -X POST -H 'Content-Type: application/json' -d '{"name":"python3"}' http://127.0.0.1:8888/api/kernels
wait
START
		cat >"$tree/etc/wrenn/ready" <<'READY'
#!/bin/sh
# Ready: the server answers and its kernel answers a kernel_info request
# (which also lets the server see it idle).
id=$(curl -fs http://127.0.0.1:8888/api/kernels | python3 -c 'import json, sys; k = json.load(sys.stdin); print(k[0]["id"] if k else "")') || exit 1
[ -n "$id" ] || exit 1
exec python3 -c "
from jupyter_client import BlockingKernelClient
c = BlockingKernelClient(connection_file='/root/.local/share/jupyter/runtime/kernel-$id.json')
c.load_connection_file()
c.start_channels()
c.wait_for_ready(timeout=20)
"
READY
		chmod 0755 "$tree/etc/wrenn/start" "$tree/etc/wrenn/ready"
	fi
	# Size: the content plus a quarter, plus 64 MiB for the user's files.
	used_kib=$(du -s --block-size=1K "$tree" | cut -f1)
	size_mib=$(( (used_kib * 5 / 4) / 1024 + 64 ))
	log "writing ext4 image of ${size_mib} MiB (no loop mount needed)"
	mkfs.ext4 -q -F -L rootfs -E root_owner=0:0 -d "$tree" "$work/rootfs.ext4" "${size_mib}M"
	mv "$work/rootfs.ext4" "$cached_image"
	rm -rf "$work"
	trap - EXIT
fi
# --- end image ---

"$builds/wrenn-image" install --dir "$wrenn_dir" --name "$name" --from "$cached_image" --envd "$builds/envd"
