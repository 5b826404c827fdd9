#!/usr/bin/env bash
# make chaos: the fault-injection tests and a longer soak, with one table of
# what was survived. Needs what make test needs (root, images, PostgreSQL).
set -uo pipefail
cd "$(dirname "$0")/.."
art=${WRENN_ARTIFACTS:-$PWD/builds/artifacts}
mkdir -p "$art"
export WRENN_ARTIFACTS=$art WRENN_REQUIRE_IMAGES=1 WRENN_REQUIRE_DB=1
export WRENN_TEST_DATABASE_URL=${WRENN_TEST_DATABASE_URL:-$(scripts/postgres.sh url)}
export WRENN_SOAK=${WRENN_SOAK:-5m}

faults=(
	"internal/controlplane/api TestPostgresRestartDuringTraffic PostgreSQL restarted under traffic"
	"internal/controlplane/api TestAgentKilledDuringCreate agent killed during a create"
	"internal/controlplane/api TestAgentKilledDuringPauseAndResume agent killed during pause and resume"
	"internal/controlplane/api TestTimeoutWhileAgentDown capsule timeout passes while its agent is down"
	"internal/agent/agenttest TestFullDisk disk under WRENN_DIR filled, then freed"
	"internal/controlplane/api TestFullDiskThroughTheAPI the same through the API: clear 503s, DB and host agree"
	"internal/agent/agenttest TestAgentRestartAdoptsRunningAndKeepsPaused agent killed; a paused record left saying running"
	"internal/controlplane/api TestNoisyNeighbour fork bomb and memory hog next to another capsule"
	"e2e TestControlPlaneRestartDuringExecStream control plane restarted during an exec stream"
	"e2e TestSoak soak: create, exec, destroy for $WRENN_SOAK"
)
rows=()
failed=0
for f in "${faults[@]}"; do
	read -r pkg test what <<<"$f"
	log=$art/chaos-$test.log
	start=$(date +%s)
	if go test "./$pkg" -run "^$test\$" -count=1 -v -timeout 30m >"$log" 2>&1; then
		result=survived
	else
		result=FAILED
		failed=$((failed + 1))
	fi
	detail=$(grep -hoE 'statuses map\[[^]]*\]|after the kill: [a-z]+|cycles": [0-9]+|"failed": [0-9]+' "$log" | tr '\n' ' ')
	rows+=("$(printf '%-62s %-9s %5ss  %s' "$what" "$result" "$(($(date +%s) - start))" "$detail")")
done
printf '\n%-62s %-9s %6s  %s\n' FAULT RESULT TIME DETAIL
printf '%s\n' "${rows[@]}"
[ -f "$art/soak.json" ] && { echo; echo "soak figures ($art/soak.json):"; cat "$art/soak.json"; }
echo
echo "logs: $art/chaos-*.log"
exit $((failed > 0))
