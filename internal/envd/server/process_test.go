package server_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

func TestEchoAndExitCodes(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)

	r := h.run(ctx, sh("echo hello; echo oops >&2"))
	if r.stdout.String() != "hello\n" || r.stderr.String() != "oops\n" {
		t.Fatalf("stdout %q stderr %q", r.stdout.String(), r.stderr.String())
	}
	if r.pid == 0 || r.end.GetExitCode() != 0 || !r.end.GetExited() || r.end.GetStatus() != "exit status 0" {
		t.Fatalf("pid %d end %v", r.pid, r.end)
	}

	r = h.run(ctx, sh("exit 42"))
	if r.end.GetExitCode() != 42 || !r.end.GetExited() || r.end.GetStatus() != "exit status 42" {
		t.Fatalf("end %v", r.end)
	}
}

func TestProtocolsConnectGRPCAndGRPCWeb(t *testing.T) {
	for name, opts := range map[string][]connect.ClientOption{
		"connect-json":  {connect.WithProtoJSON()},
		"connect-proto": nil,
		"grpc-h2c":      {connect.WithGRPC()},
		"grpc-web":      {connect.WithGRPCWeb()},
	} {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, opts...)
			if name == "grpc-h2c" {
				h.proc = processconnect.NewProcessClient(h2cClient(), h.url, opts...)
			}
			r := h.run(testCtx(t, 30*time.Second), sh("printf 'a\\0b'"))
			if r.stdout.String() != "a\x00b" || r.end.GetExitCode() != 0 {
				t.Fatalf("stdout %q end %v", r.stdout.String(), r.end)
			}
		})
	}
}

func TestEnvAndCwd(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	dir := t.TempDir()
	cwd := dir
	req := connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{
		Cmd:  "/bin/sh",
		Args: []string{"-c", `echo "$GREETING|$(pwd)|$HOME|$USER"`},
		Envs: map[string]string{"GREETING": "hi there"},
		Cwd:  &cwd,
	}})
	r := h.run(ctx, req)
	home, _ := os.UserHomeDir()
	want := fmt.Sprintf("hi there|%s|%s|", dir, home)
	if !strings.HasPrefix(r.stdout.String(), want) {
		t.Fatalf("got %q, want prefix %q", r.stdout.String(), want)
	}

	// /init variables reach later processes; the request's own win over them.
	h.initJSON(t, `{"envVars":{"FROM_INIT":"yes","GREETING":"init"}}`, "")
	r = h.run(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{
		Cmd: "/bin/sh", Args: []string{"-c", `echo "$FROM_INIT $GREETING"`}, Envs: map[string]string{"GREETING": "req"},
	}}))
	if r.stdout.String() != "yes req\n" {
		t.Fatalf("got %q", r.stdout.String())
	}
}

func TestStdinRoundTrip(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	tag := "cat-stdin"
	stream, err := h.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "cat"}, Tag: &tag,
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if !stream.Receive() || stream.Msg().GetEvent().GetStart() == nil {
		t.Fatalf("no start event: %v", stream.Err())
	}
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}
	if _, err := h.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{
		Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("first\n")}},
	})); err != nil {
		t.Fatal(err)
	}
	in := h.proc.StreamInput(ctx)
	_ = in.Send(&pb.StreamInputRequest{Event: &pb.StreamInputRequest_Start{Start: &pb.StreamInputRequest_StartEvent{Process: sel}}})
	for _, s := range []string{"second\n", "third\n"} {
		_ = in.Send(&pb.StreamInputRequest{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{
			Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte(s)}},
		}}})
	}
	if _, err := in.CloseAndReceive(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel})); err != nil {
		t.Fatal(err)
	}
	r := collect(t, stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err)
	if r.stdout.String() != "first\nsecond\nthird\n" || r.end.GetExitCode() != 0 {
		t.Fatalf("stdout %q end %v", r.stdout.String(), r.end)
	}
}

func TestPTY(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	stream, err := h.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/sh"},
		Pty:     &pb.PTY{Size: &pb.PTY_Size{Cols: 100, Rows: 30}},
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if !stream.Receive() {
		t.Fatal(stream.Err())
	}
	pid := stream.Msg().GetEvent().GetStart().GetPid()
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
	send := func(s string) {
		t.Helper()
		if _, err := h.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{
			Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte(s)}},
		})); err != nil {
			t.Fatal(err)
		}
	}
	var out bytes.Buffer
	waitFor := func(want string) {
		t.Helper()
		for !strings.Contains(out.String(), want) {
			if !stream.Receive() {
				t.Fatalf("stream ended waiting for %q; got %q (%v)", want, out.String(), stream.Err())
			}
			out.Write(stream.Msg().GetEvent().GetData().GetPty())
		}
	}
	send("tty; stty size\n")
	waitFor("/dev/pts/")
	waitFor("30 100")

	if _, err := h.proc.Update(ctx, connect.NewRequest(&pb.UpdateRequest{
		Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 132, Rows: 43}},
	})); err != nil {
		t.Fatal(err)
	}
	send("stty size\n")
	waitFor("43 132")

	// CloseStdin is for pipes; a PTY takes Ctrl-D.
	_, err = h.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	send("exit 3\n")
	r := collect(t, stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err)
	if r.end.GetExitCode() != 3 {
		t.Fatalf("end %v", r.end)
	}
}

func TestSignals(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	for _, tc := range []struct {
		sig  pb.Signal
		code int32
		stat string
	}{
		{pb.Signal_SIGNAL_SIGTERM, 143, "signal: terminated"},
		{pb.Signal_SIGNAL_SIGKILL, 137, "signal: killed"},
	} {
		// The shell's child (sleep) is in the same process group and must die too.
		stream, err := h.proc.Start(ctx, sh("sleep 300; echo never"))
		if err != nil {
			t.Fatal(err)
		}
		if !stream.Receive() {
			t.Fatal(stream.Err())
		}
		pid := stream.Msg().GetEvent().GetStart().GetPid()
		if _, err := h.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{
			Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: tc.sig,
		})); err != nil {
			t.Fatal(err)
		}
		r := collect(t, stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err)
		if r.end.GetExitCode() != tc.code || r.end.GetExited() || r.end.GetStatus() != tc.stat || r.stdout.Len() != 0 {
			t.Fatalf("%v: end %v stdout %q", tc.sig, r.end, r.stdout.String())
		}
		stream.Close()
		if processAlive(pid) {
			t.Fatalf("process %d still exists after %v", pid, tc.sig)
		}
	}
}

func processAlive(pid uint32) bool {
	return syscall.Kill(int(pid), 0) == nil
}

func TestLargeOutputBoundedMemory(t *testing.T) {
	url, cmd := devEnvd(t)
	client := newClientFor(url)
	ctx := testCtx(t, 120*time.Second)
	const size = 100 << 20
	stream, err := client.Start(ctx, sh(fmt.Sprintf("head -c %d /dev/zero", size)))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	var got int
	for stream.Receive() {
		got += len(stream.Msg().GetEvent().GetData().GetStdout())
		// A slow client: envd must apply back-pressure, not buffer.
		if got < 8<<20 {
			time.Sleep(time.Millisecond)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if got != size {
		t.Fatalf("received %d bytes, want %d", got, size)
	}
	peak := peakRSS(t, cmd.Process.Pid)
	if peak > 48<<20 {
		t.Fatalf("envd peak RSS %d MiB while streaming 100 MiB", peak>>20)
	}
	t.Logf("streamed %d MiB; envd peak RSS %d MiB", size>>20, peak>>20)
}

func TestConcurrentStarts(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 60*time.Second)
	const n = 100
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream, err := h.proc.Start(ctx, sh(fmt.Sprintf("echo %d", i)))
			if err != nil {
				errs <- err
				return
			}
			defer stream.Close()
			var out string
			var end *pb.ProcessEvent_EndEvent
			for stream.Receive() {
				out += string(stream.Msg().GetEvent().GetData().GetStdout())
				if e := stream.Msg().GetEvent().GetEnd(); e != nil {
					end = e
				}
			}
			if err := stream.Err(); err != nil || end == nil || out != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("process %d: out %q end %v err %v", i, out, end, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestReconnectByTag(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	tag := "counter"
	clientCtx, disconnect := context.WithCancel(ctx)
	stream, err := h.proc.Start(clientCtx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done"}},
		Tag:     &tag,
	}))
	if err != nil {
		t.Fatal(err)
	}
	for stream.Receive() {
		if bytes.Contains(stream.Msg().GetEvent().GetData().GetStdout(), []byte("tick 2")) {
			break
		}
	}
	disconnect()
	stream.Close()

	list, err := h.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Msg.GetProcesses()) != 1 || list.Msg.GetProcesses()[0].GetTag() != tag || list.Msg.GetProcesses()[0].GetConfig().GetCmd() != "/bin/sh" {
		t.Fatalf("list after disconnect: %v", list.Msg.GetProcesses())
	}
	pid := list.Msg.GetProcesses()[0].GetPid()

	// A second Start with the same tag is refused while the first runs.
	wantCode(t, h.startErr(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true"}, Tag: &tag})), connect.CodeAlreadyExists)

	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}
	again, err := h.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if !again.Receive() || again.Msg().GetEvent().GetStart().GetPid() != pid {
		t.Fatalf("connect: first event %v, err %v", again.Msg(), again.Err())
	}
	var out bytes.Buffer
	for out.Len() < 20 && again.Receive() {
		out.Write(again.Msg().GetEvent().GetData().GetStdout())
	}
	if !strings.Contains(out.String(), "tick ") {
		t.Fatalf("no output after reconnect: %q", out.String())
	}
	if _, err := h.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
		t.Fatal(err)
	}
	r := collect(t, again.Receive, func() *pb.ProcessEvent { return again.Msg().GetEvent() }, again.Err)
	if r.end.GetStatus() != "signal: killed" {
		t.Fatalf("end %v", r.end)
	}
	// Once ended the tag is free and the process is gone from the list.
	waitUntil(t, func() bool {
		l, _ := h.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		return l != nil && len(l.Msg.GetProcesses()) == 0
	})
	_, err = h.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
	if err == nil {
		// Connect reports a missing process when the stream starts.
		s, _ := h.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
		for s.Receive() {
		}
		err = s.Err()
	}
	wantCode(t, err, connect.CodeNotFound)
}

func TestKeepalive(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	req := sh("sleep 2.5")
	req.Header().Set("Keepalive-Ping-Interval", "1")
	r := h.run(ctx, req)
	if r.keepalives < 2 {
		t.Fatalf("got %d keepalives during 2.5 s of silence with a 1 s interval", r.keepalives)
	}
}

func TestBackgroundChildDoesNotHangStream(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	start := time.Now()
	// The background sleep inherits stdout and keeps it open.
	r := h.run(ctx, sh("sleep 30 & echo parent done"))
	if r.stdout.String() != "parent done\n" || r.end.GetExitCode() != 0 {
		t.Fatalf("stdout %q end %v", r.stdout.String(), r.end)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("stream took %v to end", d)
	}
}

func TestProcessBadInput(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	missing := "/definitely/not/here"
	cases := map[string]struct {
		req  *pb.StartRequest
		code connect.Code
	}{
		"empty cmd":    {&pb.StartRequest{Process: &pb.ProcessConfig{}}, connect.CodeInvalidArgument},
		"no process":   {&pb.StartRequest{}, connect.CodeInvalidArgument},
		"missing cwd":  {&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true", Cwd: &missing}}, connect.CodeInvalidArgument},
		"bad env name": {&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true", Envs: map[string]string{"A=B": "c"}}}, connect.CodeInvalidArgument},
		"huge pty":     {&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true"}, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 100000, Rows: 10}}}, connect.CodeInvalidArgument},
		"nul in arg":   {&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "echo", Args: []string{"a\x00b"}}}, connect.CodeInvalidArgument},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			wantCode(t, h.startErr(ctx, connect.NewRequest(tc.req)), tc.code)
		})
	}

	// A command that cannot be run is a process that says why and exits
	// as a shell's would: 127 not found, 126 not executable.
	notExec := filepath.Join(t.TempDir(), "script")
	_ = os.WriteFile(notExec, []byte("echo hi\n"), 0o644)
	for cmd, want := range map[string]struct {
		code int32
		msg  string
	}{
		"no-such-binary-wrenn": {127, "no-such-binary-wrenn: command not found\n"},
		"/no/such/file":        {127, "/no/such/file: no such file or directory\n"},
		notExec:                {126, notExec + ": permission denied (not executable)\n"},
		"/tmp":                 {126, "/tmp: is a directory\n"},
	} {
		r := h.run(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: cmd, Args: []string{"x"}}}))
		if r.end.GetExitCode() != want.code || r.stderr.String() != want.msg || r.pid == 0 {
			t.Errorf("%s: exit %d, stderr %q, pid %d", cmd, r.end.GetExitCode(), r.stderr.String(), r.pid)
		}
	}

	unknownPID := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: 999999}}
	unknownTag := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: "nope"}}
	_, err := h.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: unknownPID, Signal: pb.Signal_SIGNAL_SIGKILL}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = h.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: unknownTag, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = h.proc.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: &pb.ProcessSelector{}}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = h.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: unknownPID, Signal: pb.Signal_SIGNAL_UNSPECIFIED}))
	wantCode(t, err, connect.CodeInvalidArgument)
	wantCode(t, h.startErr(ctx, asUser(connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true"}}), "no-such-user-wrenn")), connect.CodeUnauthenticated)

	// Input to a process started without stdin is refused clearly.
	tag := "no-stdin"
	no := false
	stream, err := h.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"30"}}, Tag: &tag, Stdin: &no}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	stream.Receive()
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}
	_, err = h.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	_, err = h.proc.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 10, Rows: 10}}}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	_, _ = h.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL}))
}

func TestRunAsOtherUser(t *testing.T) {
	requireRoot(t)
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := h.run(ctx, asUser(sh("id -un; cat "+secret), "nobody"))
	if r.stdout.String() != "nobody\n" || r.end.GetExitCode() == 0 || !strings.Contains(r.stderr.String(), "Permission denied") {
		t.Fatalf("as nobody: stdout %q stderr %q end %v", r.stdout.String(), r.stderr.String(), r.end)
	}
	r = h.run(ctx, asUser(sh("id -un; cat "+secret), "root"))
	if r.stdout.String() != "root\nroot only" {
		t.Fatalf("as root: %q", r.stdout.String())
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to act as other users (envd runs as root in a VM; CI runs as root)")
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			_, file, line, _ := runtime.Caller(1)
			t.Fatalf("condition at %s:%d not met within 10 s", file, line)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
