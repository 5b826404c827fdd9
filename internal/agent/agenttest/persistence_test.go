package agenttest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// startCounter runs a background process that counts in memory and keeps
// a file open, appending each count to it.
func (a *agent) startCounter(ctx context.Context, id string) {
	a.t.Helper()
	script := `nohup bash -c 'exec 3>>/tmp/counts; i=0; while true; do i=$((i+1)); echo $i > /tmp/current; echo $i >&3; sleep 0.2; done' >/dev/null 2>&1 &
sleep 1; cat /tmp/current`
	if out, code := a.sh(ctx, id, script); code != 0 || strings.TrimSpace(out) == "" {
		a.t.Fatalf("counter did not start: %q %d", out, code)
	}
}

func (a *agent) counter(ctx context.Context, id string) int {
	a.t.Helper()
	out, _ := a.sh(ctx, id, "cat /tmp/current")
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		a.t.Fatalf("counter: %q", out)
	}
	return n
}

func TestPauseResumeKeepsMemoryAndOpenFiles(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-pause"})
	a.startCounter(ctx, sb.GetId())
	before := a.counter(ctx, sb.GetId())

	start := time.Now()
	paused, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pause took %v", time.Since(start).Round(time.Millisecond))
	if paused.Msg.GetSandbox().GetState() != pb.SandboxState_SANDBOX_STATE_PAUSED {
		t.Fatalf("state %v", paused.Msg.GetSandbox().GetState())
	}
	_, err = a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId(), Cmd: "true"}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	time.Sleep(time.Second) // a paused sandbox does not count

	start = time.Now()
	resumed, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.GetId()}))
	if err != nil {
		t.Fatalf("resume: %v\n%s", err, a.logTail())
	}
	t.Logf("resume took %v", time.Since(start).Round(time.Millisecond))
	if resumed.Msg.GetSandbox().GetAddress() != sb.GetAddress() {
		t.Fatalf("address changed from %s to %s", sb.GetAddress(), resumed.Msg.GetSandbox().GetAddress())
	}
	after := a.counter(ctx, sb.GetId())
	if after < before || after > before+10 {
		t.Fatalf("counter was %d before the pause and %d after: the process restarted or ran while paused", before, after)
	}
	time.Sleep(500 * time.Millisecond)
	// The open file kept receiving counts, in order, with no restart.
	out, _ := a.sh(ctx, sb.GetId(), "tail -n 3 /tmp/counts; head -n 1 /tmp/counts")
	lines := strings.Fields(out)
	if len(lines) != 4 || lines[3] != "1" {
		t.Fatalf("counts file: %q", out)
	}
	last, _ := strconv.Atoi(lines[2])
	if last <= after {
		t.Fatalf("the process stopped writing to its open file after resume: last %d, counter %d", last, after)
	}
	// The guest clock was corrected from the host.
	out, _ = a.sh(ctx, sb.GetId(), "date +%s")
	guestNow, _ := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if d := time.Now().Unix() - guestNow; d > 2 || d < -2 {
		t.Fatalf("guest clock is %d s off after resume", d)
	}
}

func TestAgentRestartAdoptsRunningAndKeepsPaused(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 4*time.Minute)
	running := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-survivor"})
	a.startCounter(ctx, running.GetId())
	paused := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-sleeper"})
	a.startCounter(ctx, paused.GetId())
	before := a.counter(ctx, paused.GetId())
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: paused.GetId()})); err != nil {
		t.Fatal(err)
	}

	a.kill() // kill -9: no chance to clean up
	// As if the agent had died between writing the snapshot and saving the
	// record (or the disk was full for the record): the record says running.
	recPath := filepath.Join(a.dir, "sandboxes", paused.GetId(), "sandbox.json")
	rec, err := os.ReadFile(recPath)
	if err != nil {
		t.Fatal(err)
	}
	lost := bytes.Replace(rec, []byte(`"state": "paused"`), []byte(`"state": "running"`), 1)
	if bytes.Equal(lost, rec) {
		t.Fatalf("no paused state in the record:\n%s", rec)
	}
	if err := os.WriteFile(recPath, lost, 0o600); err != nil {
		t.Fatal(err)
	}
	a.start()

	list, err := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]pb.SandboxState{}
	for _, s := range list.Msg.GetSandboxes() {
		states[s.GetId()] = s.GetState()
	}
	if states[running.GetId()] != pb.SandboxState_SANDBOX_STATE_RUNNING || states[paused.GetId()] != pb.SandboxState_SANDBOX_STATE_PAUSED || len(states) != 2 {
		t.Fatalf("after restart: %v\n%s", states, a.logTail())
	}
	if n := a.counter(ctx, running.GetId()); n < 2 {
		t.Fatalf("re-adopted sandbox counter %d", n)
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: paused.GetId()})); err != nil {
		t.Fatalf("resume after agent restart: %v\n%s", err, a.logTail())
	}
	if after := a.counter(ctx, paused.GetId()); after < before {
		t.Fatalf("paused sandbox lost its memory across the agent restart: %d then %d", before, after)
	}
}

func TestFiveSandboxesAtOnce(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 4*time.Minute)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 5)
	for i := range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("sb-many-%d", i)
			_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: id, Template: "minimal", Vcpus: 1, MemoryMib: 192}))
			if err != nil {
				errs <- fmt.Errorf("%s: %w", id, err)
				return
			}
			res, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: id, Cmd: "hostname"}))
			if err != nil || strings.TrimSpace(string(res.Msg.GetStdout())) != id {
				errs <- fmt.Errorf("%s: hostname %q %v", id, res.Msg.GetStdout(), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("5 sandboxes created concurrently in %v", time.Since(start).Round(time.Millisecond))
	list, _ := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	addrs := map[string]bool{}
	for _, s := range list.Msg.GetSandboxes() {
		addrs[s.GetAddress()] = true
	}
	if len(addrs) != 5 {
		t.Fatalf("addresses: %v", addrs)
	}
}

func TestBadInputLeavesNothing(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 2*time.Minute)
	cases := map[string]struct {
		req  *pb.CreateSandboxRequest
		code connect.Code
	}{
		"unknown template": {&pb.CreateSandboxRequest{Template: "no-such-template", Vcpus: 1, MemoryMib: 256}, connect.CodeInvalidArgument},
		"zero memory":      {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1}, connect.CodeInvalidArgument},
		"absurd vcpus":     {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 4096, MemoryMib: 256}, connect.CodeInvalidArgument},
		"absurd memory":    {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1, MemoryMib: 1 << 30}, connect.CodeInvalidArgument},
		"bad id":           {&pb.CreateSandboxRequest{Id: "../../etc", Template: "minimal", Vcpus: 1, MemoryMib: 256}, connect.CodeInvalidArgument},
		"bad template":     {&pb.CreateSandboxRequest{Template: "../minimal", Vcpus: 1, MemoryMib: 256}, connect.CodeInvalidArgument},
		"negative timeout": {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1, MemoryMib: 256, TimeoutSeconds: -1}, connect.CodeInvalidArgument},
		"bad egress":       {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1, MemoryMib: 256, Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_LIST, AllowCidrs: []string{"not-a-cidr"}}}, connect.CodeInvalidArgument},
		"empty allow list": {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1, MemoryMib: 256, Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_LIST}}, connect.CodeInvalidArgument},
		"bad env name":     {&pb.CreateSandboxRequest{Template: "minimal", Vcpus: 1, MemoryMib: 256, EnvVars: map[string]string{"A=B": "x"}}, connect.CodeInvalidArgument},
	}
	for name, tc := range cases {
		_, err := a.client.CreateSandbox(ctx, connect.NewRequest(tc.req))
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		var ce *connect.Error
		if !asConnect(err, &ce) || ce.Code() != tc.code || ce.Message() == "" {
			t.Errorf("%s: %v", name, err)
		}
	}
	if leaks := leftovers(a.dir); len(leaks) > 0 {
		t.Fatalf("rejected creates left: %v", leaks)
	}

	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-bad-input"})
	_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: sb.GetId(), Template: "minimal", Vcpus: 1, MemoryMib: 256}))
	wantCode(t, err, connect.CodeAlreadyExists)
	// A file over the agent's message limit is refused cleanly.
	_, err = a.client.WriteFile(ctx, connect.NewRequest(&pb.WriteFileRequest{SandboxId: sb.GetId(), Path: "big", Content: make([]byte, 70<<20)}))
	wantCode(t, err, connect.CodeResourceExhausted)
	_, err = a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId()}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-missing"}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.GetId(), TimeoutSeconds: -5}))
	wantCode(t, err, connect.CodeInvalidArgument)
	// A command past its own timeout is killed; the answer says so and
	// carries what it wrote until then.
	start := time.Now()
	res, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sb.GetId(), Cmd: "sh", Args: []string{"-c", "echo started; sleep 30"}, TimeoutSeconds: 1}))
	if err != nil {
		t.Fatalf("exec past its timeout: %v", err)
	}
	if !res.Msg.GetTimedOut() || res.Msg.GetExitCode() != -1 || string(res.Msg.GetStdout()) != "started\n" || time.Since(start) > 20*time.Second {
		t.Fatalf("exec past its timeout answered %+v after %v", res.Msg, time.Since(start))
	}
}

func asConnect(err error, target **connect.Error) bool {
	ce, ok := err.(*connect.Error)
	if ok {
		*target = ce
	}
	return ok
}

func TestTimeoutReaper(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	doomed := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-doomed", TimeoutSeconds: 3})
	napper := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-napper", TimeoutSeconds: 3, AutoPause: true})
	kept := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-kept", TimeoutSeconds: 3})
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		// Pinging keeps one alive.
		if _, err := a.client.PingSandbox(ctx, connect.NewRequest(&pb.PingSandboxRequest{Id: kept.GetId()})); err != nil {
			t.Fatal(err)
		}
		list, _ := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
		states := map[string]pb.SandboxState{}
		for _, s := range list.Msg.GetSandboxes() {
			states[s.GetId()] = s.GetState()
		}
		_, doomedThere := states[doomed.GetId()]
		if !doomedThere && states[napper.GetId()] == pb.SandboxState_SANDBOX_STATE_PAUSED {
			if states[kept.GetId()] != pb.SandboxState_SANDBOX_STATE_RUNNING {
				t.Fatalf("pinged sandbox is %v", states[kept.GetId()])
			}
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("reaper did not act within 60 s\n%s", a.logTail())
}

// A VMM that dies under a running sandbox (here: kill -9) is noticed within
// a reaper interval: the sandbox goes to error with the reason, refuses
// what needs a VM, and destroys cleanly.
func TestDeadVMMIsReported(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 2*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-dies"})
	pid := vmmPID(t, a.dir, sb.GetId())
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var got *pb.Sandbox
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		res, err := a.client.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: sb.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		if got = res.Msg.GetSandbox(); got.GetState() == pb.SandboxState_SANDBOX_STATE_ERROR {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sandbox stayed %v after its VMM died", got.GetState())
		}
	}
	if !strings.Contains(got.GetError(), "exited unexpectedly") || !strings.Contains(got.GetError(), strconv.Itoa(pid)) {
		t.Fatalf("error does not explain: %q", got.GetError())
	}
	_, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
}
