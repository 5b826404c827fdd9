#!/usr/bin/env bash
# Install the Debian packages Wrenn's builds and tests need, if missing.
set -euo pipefail

packages=(
	gcc make file git            # race detector, static-link check
	iptables socat               # sandbox networking, and the egress tests' outside host
	qemu-system-x86 qemu-utils   # the guest VMs (TCG without KVM), qcow2 tools
	e2fsprogs debootstrap tini   # guest images without Docker or loop mounts
	linux-source-6.1 bc bison flex libelf-dev libssl-dev xz-utils  # the guest kernel
	postgresql                   # the control plane's database (a private cluster, scripts/postgres.sh)
	chromium                     # the dashboard's browser tests (driven by playwright-core)
	procps iproute2 ca-certificates curl  # curl: make dev's health checks
	util-linux passwd systemd    # setpriv (unprivileged agent and VMMs), useradd, systemd-analyze (unit checks)
)
missing=()
for p in "${packages[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing packages: ${missing[*]} (run as root)" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
