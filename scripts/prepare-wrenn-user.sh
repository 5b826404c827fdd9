#!/usr/bin/env bash
# Prepares a host to run wrenn-agent as an unprivileged user (default
# "wrenn") and installs the systemd units of the agent and control plane.
#
#   sudo scripts/prepare-wrenn-user.sh [--user wrenn] [--dir /var/lib/wrenn]
#                                      [--bin /usr/local/bin] [--no-systemd]
#
# It is safe to run again. What it does, and why:
#  - creates the system user and group, and adds the user to kvm (/dev/kvm);
#  - gives the user WRENN_DIR (kernels, images, sandboxes, snapshots): an
#    unprivileged agent cannot manage what a root agent made, so it refuses
#    while VMMs of a root agent still run from that directory;
#  - makes sure /dev/net/tun is usable by users (Debian's udev rule already
#    does; some containers and minimal hosts do not), since an unprivileged
#    VMM opens its TAP device through it;
#  - enables IP forwarding at boot (sysctl.d);
#  - installs wrenn-agent.service (started as root, it drops to the user
#    itself with CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN; see
#    docs/security.md) and wrenn-cp.service (a dynamic user, no privilege),
#    when systemd runs this host.
set -euo pipefail
cd "$(dirname "$0")/.."
user=wrenn dir=/var/lib/wrenn bin=/usr/local/bin systemd=auto
while [ $# -gt 0 ]; do
	case $1 in
	--user) user=$2; shift 2 ;;
	--dir) dir=$2; shift 2 ;;
	--bin) bin=$2; shift 2 ;;
	--no-systemd) systemd=no; shift ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "prepare-wrenn-user: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
say() { echo "prepare-wrenn-user: $*"; }
[ "$(id -u)" = 0 ] || { echo "prepare-wrenn-user: run as root" >&2; exit 1; }

if ! getent passwd "$user" >/dev/null; then
	useradd --system --user-group --home-dir "$dir" --no-create-home --shell /usr/sbin/nologin "$user"
	say "created user $user"
fi
if getent group kvm >/dev/null; then
	usermod -aG kvm "$user"
fi

# VMMs of a root agent would be left unmanageable.
for p in /proc/[0-9]*; do
	cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || true)
	case $cmd in
	*"$dir/sandboxes/"*)
		if [ "$(stat -c %u "$p" 2>/dev/null)" = 0 ]; then
			echo "prepare-wrenn-user: a VMM of a root agent still runs from $dir (pid ${p#/proc/}); pause or destroy its sandboxes first" >&2
			exit 1
		fi
		;;
	esac
done
mkdir -p "$dir"/{kernels,images,sandboxes,snapshots}
chown -R "$user:$user" "$dir"
say "$dir belongs to $user"

if [ -e /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
	chmod 0666 /dev/net/tun
	mkdir -p /etc/udev/rules.d
	echo 'KERNEL=="tun", MODE="0666"' >/etc/udev/rules.d/60-wrenn-tun.rules
	say "/dev/net/tun is now usable by users (as on a stock Debian)"
fi

mkdir -p /etc/sysctl.d
echo "net.ipv4.ip_forward = 1" >/etc/sysctl.d/60-wrenn.conf
sysctl -q -w net.ipv4.ip_forward=1

if [ "$systemd" = auto ] && [ -d /run/systemd/system ]; then
	systemd=yes
fi
if [ "$systemd" = yes ]; then
	mkdir -p /etc/wrenn
	for unit in wrenn-agent wrenn-cp; do
		sed -e "s|@BIN@|$bin|g" -e "s|@USER@|$user|g" -e "s|@DIR@|$dir|g" -e "s|@DOC@|$PWD/docs/security.md|g" \
			"deploy/systemd/$unit.service" >"/etc/systemd/system/$unit.service"
	done
	[ -f /etc/wrenn/agent.env ] || install -m 0640 /dev/null /etc/wrenn/agent.env
	# The control plane's encryption key, made once: keep a copy apart from the database's backups.
	if [ ! -s /etc/wrenn/encryption-key ] && [ -x "$bin/wrenn-cp" ]; then
		(umask 077 && "$bin/wrenn-cp" keygen >/etc/wrenn/encryption-key)
		say "made /etc/wrenn/encryption-key for wrenn-cp (every control-plane replica needs the same key)"
	fi
	systemctl daemon-reload
	say "installed wrenn-agent.service and wrenn-cp.service; put settings in /etc/wrenn/agent.env and /etc/wrenn/cp.env (see .env.example), then: systemctl enable --now wrenn-agent"
else
	say "no systemd here; start the agent as root with: $bin/wrenn-agent --user $user --dir $dir"
fi
