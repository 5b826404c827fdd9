// Package e2e runs the whole of Wrenn as a user meets it: the real
// wrenn-cp and wrenn-agent binaries on a real PostgreSQL, QEMU VMs, and
// the public REST API (through the Go SDK) or the wrenn CLI.
package e2e

import (
	"context"
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

	"github.com/wrenn/wrenn/internal/controlplane/seal"
	"github.com/wrenn/wrenn/internal/testutil/agentargs"
	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/gobin"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	"github.com/wrenn/wrenn/internal/testutil/hostlock"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
	"github.com/wrenn/wrenn/pkg/wrenn"
)

// binaries builds wrenn-cp, wrenn-agent and wrenn once per test run and
// returns the directory holding them.
func binaries(t *testing.T) string {
	for _, name := range []string{"wrenn-cp", "wrenn-agent", "wrenn"} {
		gobin.Path(t, name)
	}
	return filepath.Dir(gobin.Path(t, "wrenn"))
}

// The stack's agent uses its own network slots, apart from other tests'.
const firstSlot, lastSlot = 2001, 3000

// stack is a running control plane and agent with an admin account.
type stack struct {
	t        *testing.T
	url      string
	agentDir string
	bin      string
	key      string // the admin's API key
	token    string // the admin's JWT
	email    string
	password string
	cp       *exec.Cmd
	agent    *exec.Cmd
	cpEnv    []string
	cpLog    string
}

// restartCP stops the control plane (SIGTERM, as a deploy would) and
// starts it again on the same address and database.
func (s *stack) restartCP() {
	_ = s.cp.Process.Signal(os.Interrupt)
	_ = s.cp.Wait()
	s.cp = process(s.t, filepath.Join(s.bin, "wrenn-cp"), s.cpLog+".2", s.cpEnv)
	s.waitHTTP(s.url + "/healthz")
}

// process runs a binary until the test ends, logging into a file that is
// printed if the test fails.
func process(t *testing.T, bin, logPath string, env []string, args ...string) *exec.Cmd {
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Signal(os.Interrupt)
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				_ = cmd.Process.Kill()
			}
		}
		if t.Failed() {
			data, _ := os.ReadFile(logPath)
			t.Logf("%s log:\n%s", filepath.Base(bin), data)
		}
	})
	return cmd
}

// startStack starts wrenn-cp (with cpEnv on top of the defaults) on a fresh database, signs up the first
// user (a platform admin), and starts an agent that registers through
// POST /v1/hosts and --register, exactly as an operator would.
func startStack(t *testing.T, cpEnv ...string) *stack {
	if os.Geteuid() != 0 {
		t.Skip("the agent needs root for namespaces, TAP devices and iptables")
	}
	agentDir := guestimages.AgentDir(t)
	hostlock.Take(t)
	bin := binaries(t)
	dbURL := pgtest.URL(t)
	work := t.TempDir()
	cpAddr := "127.0.0.1:" + freeport.Get(t)
	s := &stack{t: t, url: "http://" + cpAddr, agentDir: agentDir, bin: bin, email: "admin@example.com", password: "a long password"}
	s.cpEnv = []string{"DATABASE_URL=" + dbURL, "WRENN_CP_LISTEN_ADDR=" + cpAddr, "WRENN_RECONCILE_INTERVAL=1s", "WRENN_LOG_LEVEL=debug",
		"WRENN_SMTP_URL=", "WRENN_JWT_SECRET=", "WRENN_ENCRYPTION_KEY=" + seal.Generate(), "WRENN_ENCRYPTION_KEY_FILE="}
	s.cpEnv = append(s.cpEnv, cpEnv...)
	s.cpLog = filepath.Join(work, "cp.log")
	s.cp = process(t, filepath.Join(bin, "wrenn-cp"), s.cpLog, s.cpEnv)
	s.waitHTTP(s.url + "/healthz")

	ctx := context.Background()
	anon, err := wrenn.New(s.url)
	if err != nil {
		t.Fatal(err)
	}
	if err := anon.Signup(ctx, s.email, s.password, "Admin"); err != nil {
		t.Fatal(err)
	}
	login, err := anon.Login(ctx, s.email, s.password)
	if err != nil {
		t.Fatal(err)
	}
	s.token = login.Token
	user, _ := wrenn.New(s.url, wrenn.WithToken(login.Token))
	key, err := user.CreateAPIKey(ctx, "e2e")
	if err != nil {
		t.Fatal(err)
	}
	s.key = key.Key
	host, regToken, err := user.CreateHost(ctx)
	if err != nil {
		t.Fatal(err)
	}
	agentAddr := "127.0.0.1:" + freeport.Get(t)
	// Runs after the agent stops: a failed test must not leave VMs running.
	t.Cleanup(func() { killVMMs(agentDir) })
	args := []string{"--listen", agentAddr, "--dir", agentDir, "--register", regToken, "--address", agentAddr,
		"--cp-url", s.url, "--heartbeat-interval", "2s", "--slots", fmt.Sprintf("%d-%d", firstSlot, lastSlot)}
	// An operator's flags (WRENN_TEST_AGENT_ARGS), such as another VMM.
	args = append(args, agentargs.Parse(os.Getenv(agentargs.Variable)).For(agentDir)...)
	s.agent = process(t, filepath.Join(bin, "wrenn-agent"), filepath.Join(work, "agent.log"), []string{"WRENN_HOST_TOKEN="}, args...)
	deadline := time.Now().Add(time.Minute)
	for {
		hs, err := user.ListHosts(ctx)
		if err == nil && len(hs) == 1 && hs[0].ID == host.ID && hs[0].Status == "online" {
			break
		}

		if time.Now().After(deadline) {
			t.Fatalf("the agent did not come online: %+v %v", hs, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// --register put the token on the command line; the agent took it off.
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.agent.Process.Pid)); strings.Contains(string(cmdline), regToken) {
		t.Fatalf("the registration token is on the agent's command line: %q", cmdline)
	}
	return s
}

func (s *stack) waitHTTP(url string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s did not answer: %v", url, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// client is the Go SDK with the admin's API key.
func (s *stack) client() *wrenn.Client {
	c, err := wrenn.New(s.url, wrenn.WithAPIKey(s.key))
	if err != nil {
		s.t.Fatal(err)
	}
	return c
}

// nothingLeft checks the host has no VM, no disk and no network of a
// capsule left.
func (s *stack) nothingLeft() {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var left []string
		entries, _ := os.ReadDir(filepath.Join(s.agentDir, "sandboxes"))
		for _, e := range entries {
			left = append(left, "sandbox dir "+e.Name())
		}
		for _, ns := range s.namespaces() {
			left = append(left, "netns "+ns)
		}
		for _, vm := range s.vms() {
			left = append(left, "VMM: "+vm)
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("left on the host after every capsule was destroyed: %v", left)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// namespaces lists the network namespaces of the stack's agent's slots.
func (s *stack) namespaces() []string {
	var out []string
	list, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(list), "\n") {
		var slot int
		if _, err := fmt.Sscanf(line, "wrenn-%d", &slot); err == nil && slot >= firstSlot && slot <= lastSlot {
			out = append(out, strings.Fields(line)[0])
		}
	}
	return out
}

// vms lists the VMM processes of the stack's agent (PID and command line).
func (s *stack) vms() []string {
	var out []string
	for pid, cmdline := range vmmsOn(s.agentDir) {
		out = append(out, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(cmdline, "\x00", " ")))
	}
	return out
}

// vmmsOn finds the VMMs (QEMU or Firecracker, jailed or not) an agent on
// dir started, by pid.
func vmmsOn(dir string) map[int]string {
	out := map[int]string{}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		root, _ := os.Readlink("/proc/" + p.Name() + "/root")
		cwd, _ := os.Readlink("/proc/" + p.Name() + "/cwd")
		if agentargs.IsVMM(cmdline, root, cwd, dir) {
			out[pid] = string(cmdline)
		}
	}
	return out
}

// killVMMs kills what a failed test left running.
func killVMMs(dir string) {
	for pid := range vmmsOn(dir) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}
