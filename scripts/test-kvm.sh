#!/usr/bin/env bash
# make test-kvm: the Firecracker production path, for real, on a KVM host.
# It runs the driver's KVM suite, then the agent's own suite and the user
# journey with the agent on Firecracker: direct, with diff snapshots, on
# device-mapper disks, and jailed; and the device-mapper disk driver. Nothing
# here skips: a host without a usable /dev/kvm, device-mapper, or the
# firecracker and jailer binaries fails with the reason.
#
#   FIRECRACKER=/usr/local/bin/firecracker JAILER=/usr/local/bin/jailer make test-kvm
#
# Needs what make test needs (root, images, PostgreSQL) plus KVM and a
# Firecracker release (firecracker and, for the jailed run, jailer).
set -uo pipefail
cd "$(dirname "$0")/.."
art=${WRENN_ARTIFACTS:-$PWD/builds/artifacts}
mkdir -p "$art"
fc=${FIRECRACKER:-$(command -v firecracker || true)}
jailer=${JAILER:-$(command -v jailer || true)}
if [ -z "$fc" ] || [ ! -x "$fc" ]; then
	echo "test-kvm: no firecracker binary (set FIRECRACKER=/path/to/firecracker from a Firecracker release)" >&2
	exit 1
fi
if [ -z "$jailer" ] || [ ! -x "$jailer" ]; then
	echo "test-kvm: no jailer binary (set JAILER=/path/to/jailer from the same Firecracker release)" >&2
	exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
	echo "test-kvm: /dev/kvm is missing or not usable by $(id -un)" >&2
	exit 1
fi
if [ ! -e /dev/mapper/control ]; then
	echo "test-kvm: no device-mapper (/dev/mapper/control; modprobe dm_mod dm_snapshot)" >&2
	exit 1
fi
export WRENN_ARTIFACTS=$art WRENN_REQUIRE_IMAGES=1 WRENN_REQUIRE_DB=1 WRENN_REQUIRE_KVM=1 WRENN_REQUIRE_DM=1
export WRENN_TEST_DATABASE_URL=${WRENN_TEST_DATABASE_URL:-$(scripts/postgres.sh url)}
export WRENN_FIRECRACKER=$fc WRENN_JAILER=$jailer

# The agent suite's tests that hold for every VMM (memory templates need
# QEMU or a jailed Firecracker: they run in the jailed pass).
agent_tests='TestAgentRequiresHostToken|TestCreateExecFilesDestroyLeavesNothing|TestDiskSize|TestCallsDoNotWaitBehindACreate'
agent_tests+='|TestEnvdNeverAnswersWithoutItsToken|TestStreamingFiles|TestIsolationAndEgress|TestBackgroundProcessesAndPTY'
agent_tests+='|TestPauseResumeKeepsMemoryAndOpenFiles|TestAgentRestartAdoptsRunningAndKeepsPaused|TestFiveSandboxesAtOnce'
agent_tests+='|TestBadInputLeavesNothing|TestTimeoutReaper|TestDeadVMMIsReported|TestProxyHTTPAndUpgrade|TestSnapshotToTemplateAndStartFromIt'
journey='TestJourneyThroughTheAPI|TestJourneyThroughTheCLI|TestIngress$|TestE2BAPISemantics'
diff_tests='TestPauseResumeKeepsMemoryAndOpenFiles|TestAgentRestartAdoptsRunningAndKeepsPaused|TestSnapshotToTemplateAndStartFromIt'

# what; package; tests; the agent's flags
runs=(
	"driver;internal/agent/vmm/firecracker;KVM;"
	"device-mapper disks;internal/agent/disk/...;DeviceMapper|CreateAndRemove|Attach;"
	"agent, direct;internal/agent/agenttest;^(${agent_tests}|TestVMMCgroupLimits)\$;--vmm firecracker"
	"agent, diff snapshots;internal/agent/agenttest;^(${diff_tests})\$;--vmm firecracker --diff-snapshots"
	"agent, lazy memory;internal/agent/agenttest;^(${diff_tests}|TestDeadVMMIsReported)\$;--vmm firecracker --lazy-memory"
	"agent, dm disks;internal/agent/agenttest;^(TestCreateExecFilesDestroyLeavesNothing|TestDiskSize|${diff_tests})\$;--vmm firecracker --disk dm"
	"journey, direct;e2e;^(${journey})\$;--vmm firecracker"
	"agent, jailed;internal/agent/agenttest;^(${agent_tests}|TestMemoryTemplateClones)\$;--vmm firecracker --jailer $jailer"
	"agent, jailed lazy memory;internal/agent/agenttest;^(${diff_tests})\$;--vmm firecracker --jailer $jailer --lazy-memory"
	"journey, jailed;e2e;^(${journey}|TestSnapshotsKeepMemory)\$;--vmm firecracker --jailer $jailer"
)

rows=()
failed=0
for r in "${runs[@]}"; do
	IFS=';' read -r what pkg pattern args <<<"$r"
	log=$art/test-kvm-${what//[^a-z]/-}.log
	start=$(date +%s)
	if WRENN_TEST_AGENT_ARGS="--firecracker $fc $args" go test "./$pkg" -run "$pattern" -count=1 -v -timeout 45m >"$log" 2>&1; then
		result=passed
	else
		result=FAILED
		failed=$((failed + 1))
	fi
	rows+=("$(printf '%-24s %-7s %5ss  %s' "$what" "$result" "$(($(date +%s) - start))" "$log")")
done
printf '\n%-24s %-7s %6s  %s\n' RUN RESULT TIME LOG
printf '%s\n' "${rows[@]}"
[ "$failed" -eq 0 ]
