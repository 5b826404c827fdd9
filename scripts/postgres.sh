#!/usr/bin/env bash
# A private PostgreSQL cluster for development and tests: its own data
# folder, its own port, loopback only, password auth. No Docker, no system
# service. Usage: scripts/postgres.sh start|stop|status|url
#
#   WRENN_PG_DIR   data folder (default: <repo>/.dev/postgres)
#   WRENN_PG_PORT  TCP port on 127.0.0.1 (default: 55432)
#
# As root the server runs as the "postgres" user (PostgreSQL refuses root);
# if that user cannot reach the project folder, the data goes to /var/tmp.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
port="${WRENN_PG_PORT:-55432}"
dir="${WRENN_PG_DIR:-$repo/.dev/postgres}"
bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"

log() { echo "postgres: $*" >&2; }

[ -x "$bindir/pg_ctl" ] || { log "PostgreSQL is not installed (scripts/install-deps.sh installs it)"; exit 1; }

runas=()
if [ "$(id -u)" = 0 ]; then
	runas=(runuser -u postgres --)
	mkdir -p "$(dirname "$dir")"
	if ! runuser -u postgres -- test -x "$(dirname "$dir")"; then
		dir="/var/tmp/wrenn-postgres-$(echo -n "$repo" | sha256sum | cut -c1-12)"
		log "the postgres user cannot reach $repo; using $dir"
	fi
fi
data="$dir/data"
pwfile="$dir/password"

url() {
	echo "postgres://wrenn:$(cat "$pwfile")@127.0.0.1:$port/wrenn?sslmode=disable"
}

running() {
	[ -f "$data/postmaster.pid" ] && "${runas[@]}" "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1
}

init() {
	log "creating a cluster in $dir"
	mkdir -p "$dir"
	chmod 700 "$dir"
	umask 077
	head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$pwfile"
	if [ ${#runas[@]} -gt 0 ]; then chown -R postgres:postgres "$dir"; fi
	"${runas[@]}" "$bindir/initdb" -D "$data" -U wrenn --pwfile="$pwfile" \
		--auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
		{ cat "$dir/initdb.log" >&2; exit 1; }
	cat >>"$data/postgresql.conf" <<-EOF
		listen_addresses = '127.0.0.1'
		port = $port
		unix_socket_directories = '$dir'
		max_connections = 300
		shared_buffers = 128MB
		fsync = on
	EOF
}

start() {
	[ -f "$data/PG_VERSION" ] || init
	if running; then return 0; fi
	log "starting on 127.0.0.1:$port ($data)"
	"${runas[@]}" "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >/dev/null ||
		{ tail -20 "$dir/server.log" >&2; exit 1; }
	PGPASSWORD="$(cat "$pwfile")" "$bindir/psql" -h 127.0.0.1 -p "$port" -U wrenn -d postgres -tAc \
		"SELECT 1 FROM pg_database WHERE datname = 'wrenn'" | grep -q 1 ||
		PGPASSWORD="$(cat "$pwfile")" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U wrenn wrenn
}

case "${1:-}" in
start) start ;;
stop) if running; then "${runas[@]}" "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null; log "stopped"; fi ;;
status) if running; then echo "running: $(url)"; else echo "stopped"; exit 3; fi ;;
url) [ -f "$pwfile" ] || { log "no cluster yet: run scripts/postgres.sh start"; exit 1; }; url ;;
*) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
