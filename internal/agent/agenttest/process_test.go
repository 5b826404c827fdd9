package agenttest

import (
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

func TestBackgroundProcessesAndPTY(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-procs"})

	// A background process outlives the call that started it.
	started, err := a.client.StartProcess(ctx, connect.NewRequest(&pb.ExecRequest{
		SandboxId: sb.GetId(), Cmd: "/bin/bash", Args: []string{"-c", "for i in $(seq 1 600); do echo line $i; sleep 0.1; done"}, Tag: "ticker",
	}))
	if err != nil || started.Msg.GetPid() == 0 {
		t.Fatalf("start: %v", err)
	}
	time.Sleep(time.Second)
	list, err := a.client.ListProcesses(ctx, connect.NewRequest(&pb.ListProcessesRequest{SandboxId: sb.GetId()}))
	if err != nil || len(list.Msg.GetProcesses()) != 1 || list.Msg.GetProcesses()[0].GetTag() != "ticker" || list.Msg.GetProcesses()[0].GetPid() != started.Msg.GetPid() {
		t.Fatalf("list: %v %v", err, list.Msg.GetProcesses())
	}
	connCtx, leave := context.WithCancel(ctx)
	stream, err := a.client.ConnectProcess(connCtx, connect.NewRequest(&pb.ConnectProcessRequest{Process: &pb.ProcessRef{SandboxId: sb.GetId(), Tag: "ticker"}}))
	if err != nil {
		t.Fatal(err)
	}
	got := ""
	for !strings.Contains(got, "line ") && stream.Receive() {
		got += string(stream.Msg().GetStdout())
	}
	leave()
	stream.Close()
	if !strings.Contains(got, "line ") {
		t.Fatalf("connect saw %q (%v)", got, stream.Err())
	}
	if _, err := a.client.KillProcess(ctx, connect.NewRequest(&pb.KillProcessRequest{Process: &pb.ProcessRef{SandboxId: sb.GetId(), Pid: started.Msg.GetPid()}, Force: true})); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, _ := a.client.ListProcesses(ctx, connect.NewRequest(&pb.ListProcessesRequest{SandboxId: sb.GetId()}))
		if l != nil && len(l.Msg.GetProcesses()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("killed process still listed")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// An interactive terminal: input, resize, exit.
	term, err := a.client.ExecStream(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId(), Cmd: "/bin/bash", Pty: &pb.PtySize{Cols: 80, Rows: 24}, Tag: "shell"}))
	if err != nil {
		t.Fatal(err)
	}
	defer term.Close()
	var screen strings.Builder
	waitFor := func(want string) {
		t.Helper()
		for !strings.Contains(screen.String(), want) {
			if !term.Receive() {
				t.Fatalf("terminal ended waiting for %q: %q (%v)", want, screen.String(), term.Err())
			}
			screen.Write(term.Msg().GetPty())
		}
	}
	send := func(s string) {
		t.Helper()
		if _, err := a.client.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: &pb.ProcessRef{SandboxId: sb.GetId(), Tag: "shell"}, Data: []byte(s)})); err != nil {
			t.Fatal(err)
		}
	}
	if !term.Receive() || term.Msg().GetPid() == 0 {
		t.Fatalf("no pid first: %v", term.Err())
	}
	send("echo $((6*7)); tty\n")
	waitFor("42")
	waitFor("/dev/pts/")
	if _, err := a.client.ResizePty(ctx, connect.NewRequest(&pb.ResizePtyRequest{Process: &pb.ProcessRef{SandboxId: sb.GetId(), Tag: "shell"}, Size: &pb.PtySize{Cols: 120, Rows: 40}})); err != nil {
		t.Fatal(err)
	}
	send("stty size\n")
	waitFor("40 120")
	send("exit 5\n")
	code := int32(-1)
	for term.Receive() {
		if e, ok := term.Msg().GetEvent().(*pb.ExecStreamResponse_ExitCode); ok {
			code = e.ExitCode
		}
	}
	if code != 5 {
		t.Fatalf("terminal exit code %d (%v)", code, term.Err())
	}

	// Bad references.
	_, err = a.client.KillProcess(ctx, connect.NewRequest(&pb.KillProcessRequest{Process: &pb.ProcessRef{SandboxId: sb.GetId(), Pid: 999999}}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = a.client.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: &pb.ProcessRef{SandboxId: sb.GetId()}, Data: []byte("x")}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = a.client.ListProcesses(ctx, connect.NewRequest(&pb.ListProcessesRequest{SandboxId: "sb-nope"}))
	wantCode(t, err, connect.CodeNotFound)
}
