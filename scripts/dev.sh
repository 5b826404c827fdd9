#!/usr/bin/env bash
# make dev: the whole stack on this machine. Installs what is missing,
# builds (cached), starts PostgreSQL, wrenn-cp and one wrenn-agent that
# registers itself, signs the CLI in, proves it works with a smoke
# capsule, then runs until Ctrl-C, which pauses running capsules and stops
# everything. `scripts/dev.sh agent` runs only the agent; `scripts/dev.sh
# down` stops whatever a previous run left.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

DEV_DIR=${WRENN_DEV_DIR:-$root/.dev}
RUN_DIR=$DEV_DIR/run
LOG_DIR=$DEV_DIR/logs
WRENN_DIR=${WRENN_DIR:-/var/lib/wrenn}
CP_ADDR=${WRENN_CP_LISTEN_ADDR:-127.0.0.1:8000}
CP_URL=${WRENN_CP_URL:-http://$CP_ADDR}
AGENT_ADDR=${WRENN_HOST_LISTEN_ADDR:-127.0.0.1:50051}
ADMIN_EMAIL=${WRENN_DEV_ADMIN_EMAIL:-admin@wrenn.local}
BUILDS=$root/builds
# With DATABASE_URL set the database is someone else's; otherwise the
# private cluster in .dev/postgres is started and stopped here.
OWN_POSTGRES=1
[ -z "${DATABASE_URL:-}" ] || OWN_POSTGRES=0
export WRENN_DIR
# The shipped images start from memory at the control plane's default shapes (set it empty for none).
export WRENN_MEMORY_TEMPLATES=${WRENN_MEMORY_TEMPLATES-minimal:1:512:5120,base:2:512:5120,code-runner-beta:1:512:5120}
# Capsules of those shapes wait ready in warm pools: a create takes one (set it empty for none).
export WRENN_WARM_POOLS=${WRENN_WARM_POOLS-minimal:2,base:1}

say() { printf '\033[1;36m[dev]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[dev]\033[0m %s\n' "$*" >&2; exit 1; }

# stop_pid NAME: stops a process this script started earlier.
stop_pid() {
	local f=$RUN_DIR/$1.pid
	[ -f "$f" ] || return 0
	local pid
	pid=$(cat "$f")
	if kill -0 "$pid" 2>/dev/null; then
		kill -INT "$pid" 2>/dev/null || true
		for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

# start NAME LOGFILE CMD...: runs CMD in the background in its own
# session, writing to LOGFILE, which is shown here prefixed with [NAME].
# Ctrl-C reaches only this script (and the display), which then pauses
# capsules before it stops the servers; nothing the servers write to can
# vanish under them.
start() {
	local name=$1 log=$2
	shift 2
	: >>"$log"
	setsid "$@" >>"$log" 2>&1 </dev/null &
	local pid=$!
	echo $pid >"$RUN_DIR/$name.pid"
	# The display ends with the server (tail --pid).
	tail -n0 -F --pid="$pid" "$log" 2>/dev/null | sed -u "s/^/[$name] /" &
}

wrenn() { "$BUILDS/wrenn" --url "$CP_URL" "$@"; }

pause_running() {
	[ -x "$BUILDS/wrenn" ] || return 0
	local ids
	ids=$(wrenn sandbox list --status running --json 2>/dev/null | sed -n 's/^ *"id": "\(sb-[a-z0-9-]*\)".*/\1/p') || return 0
	for id in $ids; do
		say "pausing $id (resume it with: builds/wrenn sandbox resume $id)"
		wrenn sandbox pause "$id" >/dev/null || true
	done
}

# stop_warm_pool: ends the warm-pool VMs the agent keeps running across
# its restarts (their VMMs outlive it by design); the next agent finds
# their records dead, cleans them up and makes new members.
stop_warm_pool() {
	local pids
	pids=$(pgrep -f -- "$WRENN_DIR/sandboxes/wp-" 2>/dev/null) || return 0
	say "stopping the warm pool's VMs"
	# shellcheck disable=SC2086
	kill $pids 2>/dev/null || true
}

down() {
	pause_running
	stop_pid agent
	stop_warm_pool
	stop_pid cp
	# The private cluster is ours to stop; a DATABASE_URL given from outside is not.
	if [ "$OWN_POSTGRES" = 1 ]; then scripts/postgres.sh stop >/dev/null 2>&1 || true; fi
	say "stopped"
}

# register_agent: gives the agent credentials for this control plane,
# reusing saved ones when the control plane still knows the host.
register_agent() {
	local hostfile=$WRENN_DIR/host.json
	if [ -f "$hostfile" ]; then
		local id
		id=$(sed -n 's/.*"host_id": *"\([^"]*\)".*/\1/p' "$hostfile")
		if [ -n "$id" ] && grep -q "$CP_URL" "$hostfile" && wrenn host list --json | grep -q "\"$id\""; then
			say "agent: reusing its registration as $id"
			REGISTER_ARGS=()
			REGISTRATION_TOKEN=
			return
		fi
		say "agent: its saved registration belongs to another control plane or database; registering again"
		rm -f "$hostfile" "$WRENN_DIR/host-token"
	fi
	local token
	token=$(wrenn host token --json | sed -n 's/.*"registration_token": *"\([^"]*\)".*/\1/p')
	[ -n "$token" ] || die "could not get a registration token from the control plane"
	# The token goes in the environment, never on a command line (ps shows those).
	REGISTRATION_TOKEN=$token
	REGISTER_ARGS=(--address "$AGENT_ADDR")
}

start_agent() {
	register_agent
	say "starting wrenn-agent on $AGENT_ADDR (WRENN_DIR=$WRENN_DIR; log: $LOG_DIR/agent.log)"
	WRENN_REGISTRATION_TOKEN=$REGISTRATION_TOKEN start agent "$LOG_DIR/agent.log" "$BUILDS/wrenn-agent" --listen "$AGENT_ADDR" --cp-url "$CP_URL" --dir "$WRENN_DIR" "${REGISTER_ARGS[@]}"
	for _ in $(seq 1 300); do
		# Listening, and seen online by the control plane (the record may say
		# online from before a restart, so the port is checked too).
		if (exec 3<>"/dev/tcp/${AGENT_ADDR%:*}/${AGENT_ADDR##*:}") 2>/dev/null &&
			wrenn host list --json 2>/dev/null | grep -q '"status": "online"'; then
			return
		fi
		kill -0 "$(cat "$RUN_DIR/agent.pid")" 2>/dev/null || die "wrenn-agent exited; see $LOG_DIR/agent.log"
		sleep 0.2
	done
	die "wrenn-agent did not come online within a minute; see $LOG_DIR/agent.log"
}

wait_forever() {
	trap - EXIT
	trap 'echo; say "stopping (Ctrl-C)"; down; exit 0' INT TERM
	while true; do
		for name in "$@"; do
			if ! kill -0 "$(cat "$RUN_DIR/$name.pid" 2>/dev/null)" 2>/dev/null; then
				say "$name stopped unexpectedly; see $LOG_DIR/$name.log"
				down
				exit 1
			fi
		done
		sleep 1
	done
}

mkdir -p "$RUN_DIR" "$LOG_DIR"
[ "$(id -u)" = 0 ] || die "make dev runs as root: the agent needs namespaces, TAP devices and iptables"

case "${1:-up}" in
down)
	down
	exit 0
	;;
agent)
	[ -x "$BUILDS/wrenn-agent" ] || make --no-print-directory build
	stop_pid agent
	start_agent
	say "agent online; Ctrl-C stops it (its VMs keep running and are adopted on the next start)"
	trap 'stop_pid agent; exit 0' INT TERM
	wait "$(cat "$RUN_DIR/agent.pid")"
	exit 0
	;;
up) ;;
*) die "usage: scripts/dev.sh [up|agent|down]" ;;
esac

started=$(date +%s)
say "1/6 packages (installs only what is missing)"
scripts/install-deps.sh
say "2/6 binaries and guest images (cached; the first run builds a kernel, ~10 minutes on 2 cores)"
if [ "${WRENN_DEV_SKIP_IMAGES:-0}" = 1 ]; then
	make --no-print-directory build # the caller provides WRENN_DIR's images (the test of this script)
else
	make --no-print-directory build images
fi
say "3/6 PostgreSQL"
if [ "$OWN_POSTGRES" = 1 ]; then
	scripts/postgres.sh start
	DATABASE_URL=$(scripts/postgres.sh url)
fi
export DATABASE_URL

say "4/6 control plane on $CP_URL (log: $LOG_DIR/cp.log)"
# The key that seals the database's secrets: made once, kept apart from the database.
if [ -z "${WRENN_ENCRYPTION_KEY:-}${WRENN_ENCRYPTION_KEY_FILE:-}" ]; then
	keyfile=$DEV_DIR/encryption-key
	[ -s "$keyfile" ] || (umask 077 && "$BUILDS/wrenn-cp" keygen >"$keyfile")
	export WRENN_ENCRYPTION_KEY_FILE=$keyfile
fi
stop_pid cp
stop_pid agent
if (exec 3<>"/dev/tcp/${CP_ADDR%:*}/${CP_ADDR##*:}") 2>/dev/null; then
	die "something already listens on $CP_ADDR; stop it or set WRENN_CP_LISTEN_ADDR"
fi
# From here on, any failure stops what was started.
trap 'status=$?; if [ "$status" != 0 ]; then say "failed; stopping what was started"; down; fi' EXIT
WRENN_CP_LISTEN_ADDR=$CP_ADDR start cp "$LOG_DIR/cp.log" "$BUILDS/wrenn-cp"
for _ in $(seq 1 300); do
	curl -fs "$CP_URL/healthz" >/dev/null 2>&1 && break
	kill -0 "$(cat "$RUN_DIR/cp.pid")" 2>/dev/null || die "wrenn-cp exited; see $LOG_DIR/cp.log"
	sleep 0.1
done
curl -fs "$CP_URL/healthz" >/dev/null || die "wrenn-cp did not answer on $CP_URL"

# The admin account: its password is made once and kept in .dev/admin-password.
pwfile=$DEV_DIR/admin-password
if [ ! -s "$pwfile" ]; then
	(umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$pwfile")
fi
# The password reaches only the commands that need it, not the servers' environment.
admin_pw=$(cat "$pwfile")
if ! WRENN_PASSWORD=$admin_pw wrenn login --email "$ADMIN_EMAIL" >/dev/null 2>&1; then
	WRENN_ADMIN_PASSWORD=$admin_pw "$BUILDS/wrenn-cp" admin create --email "$ADMIN_EMAIL" --name Admin
	WRENN_PASSWORD=$admin_pw wrenn login --email "$ADMIN_EMAIL"
fi

say "5/6 agent"
start_agent

say "6/6 smoke capsule"
id=$(wrenn sandbox create --memory 256 --json | sed -n 's/^ *"id": "\(sb-[a-z0-9-]*\)".*/\1/p')
[ -n "$id" ] || die "the smoke capsule was not created; see $LOG_DIR/cp.log and $LOG_DIR/agent.log"
out=$(wrenn exec "$id" -- echo "hello from wrenn")
wrenn sandbox kill "$id" >/dev/null
[ "$out" = "hello from wrenn" ] || die "the smoke capsule answered '$out'"
say "smoke capsule $id said: $out"

cat <<EOF

  Wrenn is running ($(($(date +%s) - started)) s).
    API          $CP_URL   (OpenAPI: $CP_URL/openapi.yaml)
    Dashboard    $CP_URL   (log in as the admin below; make dev-frontend serves it with hot reload)
    Admin        $ADMIN_EMAIL, password in $pwfile
    CLI          builds/wrenn is signed in (~/.config/wrenn/config.json); try:
                   builds/wrenn sandbox create
                   builds/wrenn exec <id> -- uname -a
                   builds/wrenn shell <id>
    Logs         $LOG_DIR/cp.log, $LOG_DIR/agent.log

  Ctrl-C pauses running capsules and stops everything.

EOF
wait_forever cp agent
