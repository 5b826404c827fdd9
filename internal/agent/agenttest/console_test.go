package agenttest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/vmm"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// A guest with root writes to its serial console and the kernel log as
// fast as it can. The sandbox's kept log stays within two files of
// --console-log-kib, output over the rate is dropped and counted, the
// agent keeps answering, and the console is still kept after a pause and
// resume (a new QEMU) and after an agent restart (adopted VMs).
//
// QEMU's UART sends at the guest's baud rate (at most 115200, about
// 11 KiB/s), so this test uses small limits; a Firecracker guest's
// console is unthrottled, which TestConsoleLogIsCapped (package vmm)
// covers with gigabytes through the same code.
func TestConsoleFloodIsCapped(t *testing.T) {
	const capKiB = 16
	a := newAgent(t, "--console-log-kib", strconv.Itoa(capKiB), "--console-log-rate-kib", "2")
	ctx := testCtx(t, 5*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-console-flood"})
	runDir := filepath.Join(a.dir, "sandboxes", sb.GetId(), "run")
	logPath := vmm.LogPath(runDir)
	checkCapped := func(when string) {
		t.Helper()
		for _, p := range []string{logPath, logPath + ".1"} {
			if fi, err := os.Stat(p); err == nil && fi.Size() > capKiB<<10 {
				t.Fatalf("%s: %s is %d bytes, over %d KiB", when, filepath.Base(p), fi.Size(), capKiB)
			}
		}
	}

	flood := func() int64 {
		t.Helper()
		// stty: the fastest the UART goes; dd reports what it wrote.
		out, code := a.rootSh(ctx, sb.GetId(), `stty -F /dev/ttyS0 115200 2>/dev/null
			timeout 12 sh -c 'while :; do echo "kmsg flood line" > /dev/kmsg; done' 2>/dev/null &
			timeout -s INT 12 dd if=/dev/zero of=/dev/ttyS0 bs=4k 2>&1 | tail -1`)
		n, err := strconv.ParseInt(strings.Fields(out + " 0")[0], 10, 64)
		if code != 0 || err != nil {
			t.Fatalf("flood: %d %q", code, out)
		}
		return n
	}
	wrote := flood()
	t.Logf("the guest wrote %d KiB to its console in 12 s", wrote>>10)
	if wrote < 8*capKiB<<10 {
		t.Fatalf("the guest wrote only %d bytes: the flood did not run", wrote)
	}
	checkCapped("after the flood")
	if tail := vmm.LogTail(logPath, 50); !strings.Contains(tail, "bytes of console output dropped") {
		entries, _ := os.ReadDir(runDir)
		var files []string
		for _, e := range entries {
			fi, _ := e.Info()
			files = append(files, fmt.Sprintf("%s %d", e.Name(), fi.Size()))
		}
		t.Fatalf("no drop recorded in the log (%v): %q", files, tail)
	}
	if out, _ := a.sh(ctx, sb.GetId(), "echo still answering"); out != "still answering\n" {
		t.Fatalf("after the flood: %q", out)
	}

	// A new QEMU after pause and resume writes to the same kept log.
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // the rate limit refills
	a.rootSh(ctx, sb.GetId(), "echo after-resume-marker > /dev/ttyS0")
	waitForLog(t, logPath, "after-resume-marker")

	// An agent restart: the adopted VM's console is read again.
	a.stop()
	a.start()
	time.Sleep(3 * time.Second)
	a.rootSh(ctx, sb.GetId(), "echo after-restart-marker > /dev/ttyS0")
	waitForLog(t, logPath, "after-restart-marker")
	t.Logf("the adopted VM wrote %d KiB more", flood()>>10)
	checkCapped("after a second flood by the adopted VM")

	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	a.assertClean()
}

// rootSh is sh as root, who may write to the console.
func (a *agent) rootSh(ctx context.Context, id, script string) (string, int32) {
	a.t.Helper()
	res, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: id, Cmd: "/bin/bash", Args: []string{"-c", script}, User: "root", TimeoutSeconds: 60}))
	if err != nil {
		a.t.Fatalf("exec %q in %s: %v", script, id, err)
	}
	return string(res.Msg.GetStdout()) + string(res.Msg.GetStderr()), res.Msg.GetExitCode()
}

func waitForLog(t *testing.T, path, text string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(vmm.LogTail(path, 20), text) {
		if time.Now().After(deadline) {
			t.Fatalf("%q never reached the kept log: %s", text, vmm.LogTail(path, 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
