// Package agenttest runs the real wrenn-agent binary against real QEMU VMs,
// network namespaces and disks, and checks what an operator would check.
package agenttest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/testutil/agentargs"
	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	"github.com/wrenn/wrenn/internal/testutil/hostlock"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

const testToken = "agent-test-token-0123456789"

var agentBinary string

// extraArgs are the operator's flags for every agent (WRENN_TEST_AGENT_ARGS:
// see package agentargs), such as another VMM on a KVM host.
var extraArgs = agentargs.Parse(os.Getenv(agentargs.Variable))

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "wrenn-agent-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agentBinary = filepath.Join(dir, "wrenn-agent")
	// The agent under the race detector, ending at its first race (the
	// end-to-end suites keep plain binaries: they bound the processes'
	// memory, which the detector multiplies).
	if os.Getenv("GORACE") == "" {
		_ = os.Setenv("GORACE", "halt_on_error=1")
	}
	if out, err := exec.Command("go", "build", "-race", "-o", agentBinary, "github.com/wrenn/wrenn/cmd/wrenn-agent").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build wrenn-agent: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// agent is one running wrenn-agent with its own WRENN_DIR.
type agent struct {
	t      *testing.T
	dir    string
	addr   string
	args   []string
	hc     *http.Client // how tests reach the RPC port (plain HTTP unless set)
	scheme string
	cmd    *exec.Cmd
	client hostagentv2connect.HostAgentServiceClient
	log    *os.File
	// logPath is outside dir, so the log still tells when dir is full.
	logPath string
}

// newAgent prepares a WRENN_DIR that shares the built kernel and images
// (read only) and starts an agent on it.
func newAgent(t *testing.T, extraArgs ...string) *agent {
	t.Helper()
	return newAgentWith(t, http.DefaultClient, "http", extraArgs...)
}

// newAgentWith starts an agent that tests reach with hc over scheme.
func newAgentWith(t *testing.T, hc *http.Client, scheme string, extraArgs ...string) *agent {
	t.Helper()
	return newAgentIn(t, guestimages.AgentDir(t), hc, scheme, extraArgs...)
}

// newAgentIn starts an agent on a WRENN_DIR the test prepared.
func newAgentIn(t *testing.T, dir string, hc *http.Client, scheme string, extraArgs ...string) *agent {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the agent needs root for namespaces, TAP devices and iptables")
	}
	hostlock.Take(t)
	a := &agent{t: t, dir: dir, logPath: filepath.Join(t.TempDir(), "agent.log"), addr: "127.0.0.1:" + freeport.Get(t), args: extraArgs, hc: hc, scheme: scheme}
	a.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent log (last lines):\n%s", a.logTail())
		}
		a.stop()
		a.destroyAll()
		a.assertClean()
	})
	return a
}

func (a *agent) start() {
	t := a.t
	f, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	a.log = f
	args := append([]string{"--listen", a.addr, "--dir", a.dir, "--log-level", "debug"}, extraArgs.For(a.dir)...)
	args = append(args, a.args...)
	cmd := exec.Command(agentBinary, args...)
	cmd.Env = append(os.Environ(), "WRENN_HOST_TOKEN="+testToken)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a.cmd = cmd
	a.client = hostagentv2connect.NewHostAgentServiceClient(withToken(a.hc, testToken), a.scheme+"://"+a.addr)
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := a.client.GetHostInfo(context.Background(), connect.NewRequest(&pb.GetHostInfoRequest{}))
		if err == nil {
			if got := info.Msg.GetVmm(); got != extraArgs.VMM() {
				t.Fatalf("the agent runs %s, not the %s asked for", got, extraArgs.VMM())
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent did not come up: %v\n%s", err, a.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends the agent gracefully (its VMs keep running).
func (a *agent) stop() {
	if a.cmd == nil || a.cmd.ProcessState != nil {
		return
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	_ = a.cmd.Wait()
	a.log.Close()
}

// kill ends the agent the hard way.
func (a *agent) kill() {
	_ = a.cmd.Process.Kill()
	_ = a.cmd.Wait()
	a.log.Close()
}

func (a *agent) logTail() string {
	data, _ := os.ReadFile(a.logPath)
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// destroyAll removes what a failed test left, through a fresh agent.
func (a *agent) destroyAll() {
	a.start()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Warm pools first (the control plane's setting of 0 wins over the
	// operator's), so that none refills.
	if info, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{})); err == nil && len(info.Msg.GetWarmPools()) > 0 {
		var none []*pb.WarmPool
		for _, p := range info.Msg.GetWarmPools() {
			none = append(none, &pb.WarmPool{Template: p.GetPool().GetTemplate()})
		}
		_, _ = a.client.SetWarmPools(ctx, connect.NewRequest(&pb.SetWarmPoolsRequest{Pools: none}))
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			info, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
			members := int32(0)
			for _, p := range info.Msg.GetWarmPools() {
				members += p.GetReady() + p.GetStarting()
			}
			if err != nil || members == 0 {
				break
			}
		}
	}
	list, err := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err == nil {
		for _, s := range list.Msg.GetSandboxes() {
			_, _ = a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: s.GetId()}))
		}
	}
	a.stop()
}

// assertClean checks that nothing of any sandbox is left on the host.
func (a *agent) assertClean() {
	t := a.t
	if leaks := leftovers(a.dir); len(leaks) > 0 {
		t.Errorf("left behind on the host:\n  %s", strings.Join(leaks, "\n  "))
	}
}

func leftovers(dir string) []string {
	var leaks []string
	for _, sub := range []string{"sandboxes", "snapshots"} {
		entries, _ := os.ReadDir(filepath.Join(dir, sub))
		for _, e := range entries {
			leaks = append(leaks, filepath.Join(sub, e.Name()))
		}
	}
	netns, _ := os.ReadDir("/run/netns")
	for _, e := range netns {
		if strings.HasPrefix(e.Name(), "wrenn-") {
			leaks = append(leaks, "netns "+e.Name())
		}
	}
	links, _ := os.ReadDir("/sys/class/net")
	for _, l := range links {
		if strings.HasPrefix(l.Name(), "wrn") {
			leaks = append(leaks, "link "+l.Name())
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		root, _ := os.Readlink("/proc/" + p.Name() + "/root")
		cwd, _ := os.Readlink("/proc/" + p.Name() + "/cwd")
		if agentargs.IsVMM(cmdline, root, cwd, dir) {
			leaks = append(leaks, "VMM pid "+p.Name())
		}
	}
	if f, err := os.Open("/proc/self/mountinfo"); err == nil {
		if h, err := cgroup.Detect(f, "wrenn"); err == nil {
			for _, g := range h.EmptyGroups() {
				leaks = append(leaks, "cgroup wrenn/"+g)
			}
		}
		f.Close()
	}
	routes, _ := exec.Command("ip", "route", "show", "10.201.0.0/16").Output()
	if s := strings.TrimSpace(string(routes)); s != "" {
		leaks = append(leaks, "routes: "+s)
	}
	return leaks
}

// withToken returns a copy of hc that sends the host token on every call,
// unary and streaming alike.
func withToken(hc *http.Client, token string) *http.Client {
	next := hc.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	return &http.Client{Transport: bearerTransport{token: token, next: next}}
}

type bearerTransport struct {
	token string
	next  http.RoundTripper
}

func (b bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

func (a *agent) create(ctx context.Context, req *pb.CreateSandboxRequest) *pb.Sandbox {
	a.t.Helper()
	if req.Template == "" {
		req.Template = "minimal"
	}
	if req.Vcpus == 0 {
		req.Vcpus = 1
	}
	if req.MemoryMib == 0 {
		req.MemoryMib = 256
	}
	res, err := a.client.CreateSandbox(ctx, connect.NewRequest(req))
	if err != nil {
		a.t.Fatalf("create: %v\n%s", err, a.logTail())
	}
	return res.Msg.GetSandbox()
}

// sh runs a shell command in a sandbox and returns stdout and the exit code.
func (a *agent) sh(ctx context.Context, id, script string) (string, int32) {
	a.t.Helper()
	res, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: id, Cmd: "/bin/bash", Args: []string{"-c", script}, TimeoutSeconds: 30}))
	if err != nil {
		a.t.Fatalf("exec %q in %s: %v", script, id, err)
	}
	return string(res.Msg.GetStdout()) + string(res.Msg.GetStderr()), res.Msg.GetExitCode()
}

func wantCode(t *testing.T, err error, code connect.Code) {
	t.Helper()
	var ce *connect.Error
	if err == nil || !errors.As(err, &ce) || ce.Code() != code {
		t.Fatalf("want %v, got %v", code, err)
	}
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
