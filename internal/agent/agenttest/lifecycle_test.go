package agenttest

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

func TestAgentRequiresHostToken(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 30*time.Second)
	for name, client := range map[string]hostagentv2connect.HostAgentServiceClient{
		"no token":    hostagentv2connect.NewHostAgentServiceClient(http.DefaultClient, "http://"+a.addr),
		"wrong token": hostagentv2connect.NewHostAgentServiceClient(withToken(http.DefaultClient, testToken+"x"), "http://"+a.addr),
	} {
		_, err := client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
		if err == nil {
			t.Fatalf("%s: call succeeded", name)
		}
		wantCode(t, err, connect.CodeUnauthenticated)
	}
	info, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if info.Msg.GetCpus() < 1 || info.Msg.GetMemoryBytes() == 0 || info.Msg.GetVmm() != extraArgs.VMM() || info.Msg.GetDiskBytes() == 0 || len(info.Msg.GetTemplates()) == 0 {
		t.Fatalf("host info %v", info.Msg)
	}
}

func TestCreateExecFilesDestroyLeavesNothing(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	start := time.Now()
	sb := a.create(ctx, &pb.CreateSandboxRequest{
		Id: "sb-lifecycle", EnvVars: map[string]string{"GREETING": "hello from wrenn"}, Metadata: map[string]string{"owner": "test"},
	})
	t.Logf("create to ready: %v", time.Since(start).Round(time.Millisecond))
	if sb.GetState() != pb.SandboxState_SANDBOX_STATE_RUNNING || sb.GetAddress() == "" || sb.GetMetadata()["owner"] != "test" {
		t.Fatalf("created %v", sb)
	}

	if out, code := a.sh(ctx, sb.GetId(), `echo "$GREETING"; whoami`); out != "hello from wrenn\nuser\n" || code != 0 {
		t.Fatalf("exec: %q %d", out, code)
	}
	if _, code := a.sh(ctx, sb.GetId(), "exit 7"); code != 7 {
		t.Fatalf("exit code %d", code)
	}
	// Calls reuse the agent's connections to envd: its descriptors stay flat.
	fds := func() int {
		entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", a.cmd.Process.Pid))
		return len(entries)
	}
	before := fds()
	for range 30 {
		if _, err := a.client.ListDir(ctx, connect.NewRequest(&pb.ListDirRequest{SandboxId: sb.GetId(), Path: "/"})); err != nil {
			t.Fatal(err)
		}
	}
	if after := fds(); after > before+4 {
		t.Fatalf("the agent holds %d descriptors after 30 calls, %d before: connections to envd are not reused", after, before)
	}
	res, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId(), Cmd: "cat", Stdin: []byte("piped in"), User: "root"}))
	if err != nil || string(res.Msg.GetStdout()) != "piped in" {
		t.Fatalf("stdin: %v %q", err, res.Msg.GetStdout())
	}

	// Streaming exec delivers output as it happens.
	stream, err := a.client.ExecStream(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId(), Cmd: "/bin/sh", Args: []string{"-c", "echo one; sleep 0.3; echo two >&2; exit 3"}}))
	if err != nil {
		t.Fatal(err)
	}
	var events []string
	for stream.Receive() {
		switch e := stream.Msg().GetEvent().(type) {
		case *pb.ExecStreamResponse_Pid:
			events = append(events, "pid")
		case *pb.ExecStreamResponse_Stdout:
			events = append(events, "out:"+string(e.Stdout))
		case *pb.ExecStreamResponse_Stderr:
			events = append(events, "err:"+string(e.Stderr))
		case *pb.ExecStreamResponse_ExitCode:
			events = append(events, "exit:"+string(rune('0'+e.ExitCode)))
		}
	}
	if err := stream.Err(); err != nil || strings.Join(events, "|") != "pid|out:one\n|err:two\n|exit:3" {
		t.Fatalf("stream: %v %q", err, events)
	}

	// Files.
	data := bytes.Repeat([]byte{0, 1, 2, 250}, 256<<10) // 1 MiB of binary
	if _, err := a.client.WriteFile(ctx, connect.NewRequest(&pb.WriteFileRequest{SandboxId: sb.GetId(), Path: "work/data.bin", Content: data})); err != nil {
		t.Fatal(err)
	}
	read, err := a.client.ReadFile(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: sb.GetId(), Path: "/home/user/work/data.bin"}))
	if err != nil || !bytes.Equal(read.Msg.GetContent(), data) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(read.Msg.GetContent(), data))
	}
	if _, err := a.client.MakeDir(ctx, connect.NewRequest(&pb.MakeDirRequest{SandboxId: sb.GetId(), Path: "work/sub"})); err != nil {
		t.Fatal(err)
	}
	list, err := a.client.ListDir(ctx, connect.NewRequest(&pb.ListDirRequest{SandboxId: sb.GetId(), Path: "work"}))
	if err != nil || len(list.Msg.GetEntries()) != 2 {
		t.Fatalf("list: %v %v", err, list.Msg.GetEntries())
	}
	if _, err := a.client.RemovePath(ctx, connect.NewRequest(&pb.RemovePathRequest{SandboxId: sb.GetId(), Path: "work"})); err != nil {
		t.Fatal(err)
	}
	_, err = a.client.ReadFile(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: sb.GetId(), Path: "work/data.bin"}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = a.client.ReadFile(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: sb.GetId(), Path: "/etc/shadow", User: "user"}))
	wantCode(t, err, connect.CodePermissionDenied)

	m, err := a.client.GetSandboxMetrics(ctx, connect.NewRequest(&pb.GetSandboxMetricsRequest{Id: sb.GetId()}))
	if err != nil || m.Msg.GetMemTotalBytes() == 0 || m.Msg.GetVmmRssBytes() == 0 || m.Msg.GetCpuCount() != 1 {
		t.Fatalf("metrics: %v %v", err, m.Msg)
	}
	t.Logf("idle sandbox: VMM RSS %d MiB, guest uses %d of %d MiB", m.Msg.GetVmmRssBytes()>>20, m.Msg.GetMemUsedBytes()>>20, m.Msg.GetMemTotalBytes()>>20)

	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	if leaks := leftovers(a.dir); len(leaks) > 0 {
		t.Fatalf("after destroy: %v", leaks)
	}
	// Destroying again is fine; using it is not.
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatalf("second destroy: %v", err)
	}
	_, err = a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId(), Cmd: "true"}))
	wantCode(t, err, connect.CodeNotFound)
}

func TestDiskSize(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 2*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-bigdisk", DiskSizeMib: 1024})
	if sb.GetDiskSizeMib() != 1024 {
		t.Fatalf("disk size %d", sb.GetDiskSizeMib())
	}
	// The template's file system (about 200 MiB) was grown to the disk.
	out, code := a.sh(ctx, sb.GetId(), "df -m --output=size / | tail -1")
	var mib int
	fmt.Sscanf(strings.TrimSpace(out), "%d", &mib)
	if code != 0 || mib < 900 {
		t.Fatalf("root file system is %q MiB, want about 1024", out)
	}
	_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1, MemoryMib: 256, DiskSizeMib: 16}))
	wantCode(t, err, connect.CodeInvalidArgument)
}

// Looking at a sandbox never waits behind an operation on it: during its
// create GetSandbox answers at once (pending or starting), and a call that
// needs the sandbox's lock gives up when its caller's deadline passes,
// saying the sandbox is busy; during a pause or resume it is shown pausing
// or resuming.
func TestCallsDoNotWaitBehindACreate(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	created := make(chan error, 1)
	go func() {
		_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: "sb-busy", Template: "minimal", Vcpus: 1, MemoryMib: 256}))
		created <- err
	}()
	var seen *pb.Sandbox
	for deadline := time.Now().Add(10 * time.Second); seen == nil && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		start := time.Now()
		r, err := a.client.GetSandbox(gctx, connect.NewRequest(&pb.GetSandboxRequest{Id: "sb-busy"}))
		cancel()
		if time.Since(start) > time.Second {
			t.Fatalf("GetSandbox took %v during a create", time.Since(start))
		}
		if err == nil {
			seen = r.Msg.GetSandbox()
		}
	}
	if seen == nil {
		t.Fatal("the sandbox being created was never visible")
	}
	if s := seen.GetState(); s == pb.SandboxState_SANDBOX_STATE_PENDING || s == pb.SandboxState_SANDBOX_STATE_STARTING {
		// A pause must wait for the create: with a short deadline it gives up, busy.
		pctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		_, err := a.client.PauseSandbox(pctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-busy"}))
		cancel()
		if err == nil {
			t.Fatal("a pause during the create succeeded")
		}
	} else {
		t.Logf("the create was already done when first seen (%v)", s)
	}
	if err := <-created; err != nil {
		t.Fatal(err)
	}
	// While a pause or a resume runs, the sandbox is shown pausing or
	// resuming (not running, nor paused before it is).
	for _, op := range []struct {
		name    string
		call    func() error
		passing pb.SandboxState
	}{
		{"pause", func() error {
			_, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-busy"}))
			return err
		}, pb.SandboxState_SANDBOX_STATE_PAUSING},
		{"resume", func() error {
			_, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: "sb-busy"}))
			return err
		}, pb.SandboxState_SANDBOX_STATE_RESUMING},
	} {
		done := make(chan error, 1)
		go func() { done <- op.call() }()
		seenPassing := false
		for finished := false; !finished; {
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("%s: %v", op.name, err)
				}
				finished = true
			default:
				r, err := a.client.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: "sb-busy"}))
				seenPassing = seenPassing || (err == nil && r.Msg.GetSandbox().GetState() == op.passing)
				time.Sleep(2 * time.Millisecond)
			}
		}
		if !seenPassing {
			t.Errorf("the sandbox was never shown %v during its %s", op.passing, op.name)
		}
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: "sb-busy"})); err != nil {
		t.Fatal(err)
	}
}
