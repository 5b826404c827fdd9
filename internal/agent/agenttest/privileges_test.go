package agenttest

import (
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// agentCaps is CAP_NET_ADMIN (12), CAP_NET_RAW (13) and CAP_SYS_ADMIN (21).
const agentCaps = "0000000000203000"

func status(t *testing.T, pid int, field string) string {
	t.Helper()
	v, err := procfs.Status(pid, field)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// checkVMMPrivileges asserts that a VMM holds no capability and cannot
// gain one, and runs as uid.
func checkVMMPrivileges(t *testing.T, pid int, uid, bounding string) {
	t.Helper()
	for field, want := range map[string]string{"CapEff": "0000000000000000", "CapPrm": "0000000000000000",
		"CapAmb": "0000000000000000", "CapBnd": bounding, "NoNewPrivs": "1"} {
		if got := status(t, pid, field); got != want {
			t.Errorf("QEMU %s = %s, want %s", field, got, want)
		}
	}
	if got := strings.Fields(status(t, pid, "Uid")); len(got) != 4 || got[0] != uid || got[1] != uid {
		t.Errorf("QEMU runs as uid %v, want %s", got, uid)
	}
}

// TestUnprivilegedAgent prepares the host with scripts/prepare-wrenn-user.sh
// and runs the agent with --user wrenn: it goes on as wrenn with exactly
// three capabilities, and a sandbox's whole life works; its QEMU runs as
// wrenn with no capability, in its cgroup.
func TestUnprivilegedAgent(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("preparing the wrenn user needs root")
	}
	// A WRENN_DIR the user can reach (t.TempDir's parents are private).
	base, err := os.MkdirTemp("/var/tmp", "wrenn-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	dir := guestimages.AgentDirIn(t, base)
	if out, err := exec.Command("../../../scripts/prepare-wrenn-user.sh", "--user", "wrenn", "--dir", dir, "--no-systemd").CombinedOutput(); err != nil {
		t.Fatalf("prepare-wrenn-user.sh: %v\n%s", err, out)
	}
	u, err := user.Lookup("wrenn")
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(filepath.Join(dir, "sandboxes"))
	if fi == nil || !fi.IsDir() {
		t.Fatalf("prepare-wrenn-user.sh did not make %s/sandboxes", dir)
	}

	a := newAgentIn(t, dir, http.DefaultClient, "http", "--user", "wrenn")
	pid := a.cmd.Process.Pid
	if got := strings.Fields(status(t, pid, "Uid")); got[0] != u.Uid || got[1] != u.Uid || got[2] != u.Uid {
		t.Fatalf("agent uids %v, want %s", got, u.Uid)
	}
	for _, field := range []string{"CapEff", "CapPrm", "CapBnd", "CapAmb"} {
		if got := status(t, pid, field); got != agentCaps {
			t.Errorf("agent %s = %s, want %s (net_admin, net_raw, sys_admin)", field, got, agentCaps)
		}
	}
	if !strings.Contains(a.logTail(), "privileges uid="+u.Uid) {
		t.Errorf("the agent did not log its privileges:\n%s", a.logTail())
	}

	ctx := testCtx(t, 4*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-unpriv"})
	qemu := vmmPID(t, a.dir, sb.GetId())
	checkVMMPrivileges(t, qemu, u.Uid, agentCaps)
	checkConfined(t, vmmCgroups(t), sb.GetId(), qemu, 1, 256)
	if out, code := a.sh(ctx, sb.GetId(), "echo hello > ~/f && cat ~/f"); code != 0 || !strings.HasPrefix(out, "hello") {
		t.Fatalf("exec: %q (%d)", out, code)
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatalf("pause: %v\n%s", err, a.logTail())
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatalf("resume: %v\n%s", err, a.logTail())
	}
	if out, _ := a.sh(ctx, sb.GetId(), "cat ~/f"); strings.TrimSpace(out) != "hello" {
		t.Fatalf("after resume: %q", out)
	}
	checkVMMPrivileges(t, vmmPID(t, a.dir, sb.GetId()), u.Uid, agentCaps)
	// The sandbox's files on the host belong to wrenn, not root.
	st, err := os.Stat(filepath.Join(dir, "sandboxes", sb.GetId(), "sandbox.json"))
	if err != nil {
		t.Fatal(err)
	}
	if owner := strconv.Itoa(int(st.Sys().(*syscall.Stat_t).Uid)); owner != u.Uid {
		t.Errorf("sandbox.json belongs to uid %s", owner)
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
}
