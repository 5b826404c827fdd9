package agenttest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/testutil/agentargs"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// vmmCgroups is the layout the agents under test use (the default parent).
func vmmCgroups(t *testing.T) cgroup.Hierarchy {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := cgroup.Detect(f, "wrenn")
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// vmmPID is the VMM process of sandbox id run by the agent on dir (QEMU
// or Firecracker, jailed or not), as the agent's record names it.
func vmmPID(t *testing.T, dir, id string) int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "sandboxes", id, "sandbox.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		VMM struct {
			PID int `json:"pid"`
		} `json:"vmm"`
	}
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatal(err)
	}
	p := "/proc/" + strconv.Itoa(rec.VMM.PID)
	cmdline, _ := os.ReadFile(p + "/cmdline")
	root, _ := os.Readlink(p + "/root")
	if rec.VMM.PID <= 0 || !agentargs.IsVMM(cmdline, root, "", dir) {
		t.Fatalf("the record of %s names pid %d, not a VMM of this agent (%q)", id, rec.VMM.PID, cmdline)
	}
	return rec.VMM.PID
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

// checkConfined asserts that every thread of pid is in the sandbox's
// groups and that the groups carry the VM's limits.
func checkConfined(t *testing.T, h cgroup.Hierarchy, id string, pid, vcpus, memoryMiB int) {
	t.Helper()
	want := cgroup.ForVM(vcpus, memoryMiB, 256)
	for _, dir := range h.Paths(id) {
		threads, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
		procs := " " + strings.Join(strings.Fields(readTrim(t, filepath.Join(dir, "cgroup.procs"))), " ") + " "
		if !strings.Contains(procs, " "+strconv.Itoa(pid)+" ") {
			t.Fatalf("QEMU %d is not in %s (holds%s)", pid, dir, procs)
		}
		if !h.V2 {
			tasks := " " + strings.Join(strings.Fields(readTrim(t, filepath.Join(dir, "tasks"))), " ") + " "
			for _, th := range threads {
				if !strings.Contains(tasks, " "+th.Name()+" ") {
					t.Fatalf("QEMU thread %s is not in %s", th.Name(), dir)
				}
			}
		}
	}
	limits := map[string]string{}
	if h.V2 {
		limits["cpu/cpu.max"] = strconv.Itoa(int(want.CPUs*100000)) + " 100000"
		limits["memory/memory.max"] = strconv.FormatInt(want.MemoryBytes, 10)
	} else {
		limits["cpu/cpu.cfs_quota_us"] = strconv.Itoa(int(want.CPUs * 100000))
		limits["memory/memory.limit_in_bytes"] = strconv.FormatInt(want.MemoryBytes, 10)
	}
	limits["pids/pids.max"] = strconv.Itoa(want.Pids)
	for key, value := range limits {
		controller, file, _ := strings.Cut(key, "/")
		if got := readTrim(t, filepath.Join(h.Dirs[controller], id, file)); got != value {
			t.Errorf("%s of %s is %q, want %q", file, id, got, value)
		}
	}
}

func groupGone(t *testing.T, h cgroup.Hierarchy, id string) {
	t.Helper()
	for _, dir := range h.Paths(id) {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Fatalf("cgroup %s still there (%v)", dir, err)
		}
	}
}

// TestVMMCgroupLimits: each QEMU runs in a cgroup of its own, capped at its
// VM's vCPUs, memory and a process count, from its first moment (boot and
// restore alike), holding no capability; the group goes when the VMM does.
func TestVMMCgroupLimits(t *testing.T) {
	a := newAgent(t)
	h := vmmCgroups(t)
	ctx := testCtx(t, 4*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-cgroup", Vcpus: 2, MemoryMib: 384})
	checkConfined(t, h, sb.GetId(), vmmPID(t, a.dir, sb.GetId()), 2, 384)
	// Under a root agent the VMM is root with every capability gone.
	checkVMMPrivileges(t, vmmPID(t, a.dir, sb.GetId()), "0", "0000000000000000")

	// Load the guest, then read what the VMM really used against its cap.
	if out, code := a.sh(ctx, sb.GetId(), "head -c 200M /dev/zero | tail -c 1 >/dev/null; for i in 1 2; do timeout 3 sh -c 'while :; do :; done' & done; wait; echo ok"); code != 0 {
		t.Fatalf("load: %s", out)
	}
	if !h.V2 {
		peak, _ := strconv.ParseInt(readTrim(t, filepath.Join(h.Dirs["memory"], sb.GetId(), "memory.max_usage_in_bytes")), 10, 64)
		throttled := readTrim(t, filepath.Join(h.Dirs["cpu"], sb.GetId(), "cpu.stat"))
		t.Logf("QEMU peak memory %d MiB of a %d MiB cap; cpu.stat: %s", peak>>20, cgroup.ForVM(2, 384, 256).MemoryBytes>>20, strings.ReplaceAll(throttled, "\n", ", "))
	}

	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	groupGone(t, h, sb.GetId())
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	checkConfined(t, h, sb.GetId(), vmmPID(t, a.dir, sb.GetId()), 2, 384)

	// An agent restart keeps the running VM's group.
	a.kill()
	a.start()
	checkConfined(t, h, sb.GetId(), vmmPID(t, a.dir, sb.GetId()), 2, 384)

	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	groupGone(t, h, sb.GetId())
}
