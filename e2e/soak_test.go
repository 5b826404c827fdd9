package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/pkg/wrenn"
)

// usage is what the soak test watches for leaks.
type usage struct {
	CPRSSMiB, AgentRSSMiB float64
	CPFDs, AgentFDs       int
	DirMiB                float64 // $WRENN_DIR, following nothing (images are symlinks)
	Namespaces, VMs       int
}

func measure(t *testing.T, s *stack) usage {
	rss := func(pid int) float64 { return float64(procfs.RSS(pid)) / (1 << 20) }
	fds := func(pid int) int {
		entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		return len(entries)
	}
	u := usage{CPRSSMiB: rss(s.cp.Process.Pid), AgentRSSMiB: rss(s.agent.Process.Pid), CPFDs: fds(s.cp.Process.Pid), AgentFDs: fds(s.agent.Process.Pid)}
	out, _ := exec.Command("du", "-sk", "-P", s.agentDir).Output()
	if f := strings.Fields(string(out)); len(f) > 0 {
		kb, _ := strconv.ParseFloat(f[0], 64)
		u.DirMiB = kb / 1024
	}
	u.Namespaces, u.VMs = len(s.namespaces()), len(s.vms())
	return u
}

// Capsules are created, used and destroyed in a loop for a bounded time
// (WRENN_SOAK, default 45s): the control plane's and agent's memory and
// file descriptors and the host's disk, namespaces and VMs stay flat.
// The figures go to $WRENN_ARTIFACTS/soak.json.
func TestSoak(t *testing.T) {
	d := 45 * time.Second
	if v := os.Getenv("WRENN_SOAK"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			t.Fatalf("WRENN_SOAK: %v", err)
		}
	}
	s := startStack(t)
	c := s.client()
	ctx := context.Background()
	cycle := func(i int) error {
		sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
		if err != nil {
			return fmt.Errorf("create: %w", err)
		}
		res, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", fmt.Sprintf("echo %d > /tmp/n; cat /tmp/n", i)}})
		if err != nil || string(res.Stdout) != fmt.Sprintf("%d\n", i) {
			return fmt.Errorf("exec: %q %v", res.Stdout, err)
		}
		if _, err := c.DestroyCapsule(ctx, sb.ID); err != nil {
			return fmt.Errorf("destroy: %w", err)
		}
		return nil
	}
	// Warm up (first allocations, caches), then take the baseline.
	for i := range 2 {
		if err := cycle(i); err != nil {
			t.Fatal(err)
		}
	}
	s.nothingLeft()
	before := measure(t, s)
	start := time.Now()
	cycles, failed := 0, 0
	for time.Since(start) < d {
		if err := cycle(cycles); err != nil {
			failed++
			t.Errorf("cycle %d: %v", cycles, err)
		}
		cycles++
	}
	s.nothingLeft()
	time.Sleep(2 * time.Second) // let connections and goroutines of the last cycle close
	after := measure(t, s)
	report := map[string]any{"seconds": time.Since(start).Seconds(), "cycles": cycles, "failed": failed, "before": before, "after": after}
	data, _ := json.MarshalIndent(report, "", "  ")
	t.Logf("soak: %s", data)
	if dir := os.Getenv("WRENN_ARTIFACTS"); dir != "" {
		_ = os.MkdirAll(dir, 0o755)
		_ = os.WriteFile(filepath.Join(dir, "soak.json"), data, 0o644)
	}
	if cycles < 3 {
		t.Fatalf("only %d cycles ran", cycles)
	}
	grew := func(name string, b, a, slack float64) {
		if a > b+slack {
			t.Errorf("%s grew from %.1f to %.1f over %d cycles", name, b, a, cycles)
		}
	}
	grew("control plane RSS (MiB)", before.CPRSSMiB, after.CPRSSMiB, 16+before.CPRSSMiB/4)
	grew("agent RSS (MiB)", before.AgentRSSMiB, after.AgentRSSMiB, 16+before.AgentRSSMiB/4)
	grew("control plane file descriptors", float64(before.CPFDs), float64(after.CPFDs), 8)
	grew("agent file descriptors", float64(before.AgentFDs), float64(after.AgentFDs), 8)
	grew("WRENN_DIR (MiB)", before.DirMiB, after.DirMiB, 2)
	if after.Namespaces != 0 || after.VMs != 0 {
		t.Errorf("left after the loop: %d namespaces, %d VMs", after.Namespaces, after.VMs)
	}
}

// The control plane restarts (a deploy) while a client follows a command's
// output: the client is told the stream ended early, the capsule keeps
// running on its host, and after the restart everything works as before.
func TestControlPlaneRestartDuringExecStream(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx := context.Background()
	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 100)
	done := make(chan error, 1)
	go func() {
		_, err := c.ExecStream(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "for i in $(seq 1 300); do echo line $i; sleep 0.1; done"}},
			func(_ string, data []byte) { lines <- string(data) })
		done <- err
	}()
	select {
	case <-lines:
	case <-time.After(30 * time.Second):
		t.Fatal("no output before the restart")
	}
	start := time.Now()
	s.restartCP()
	t.Logf("control plane back in %s", time.Since(start).Round(time.Millisecond))
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "ended before the command did") {
			t.Fatalf("the client was not told the stream broke: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the stream hung across the restart")
	}
	cur, err := c.GetCapsule(ctx, sb.ID)
	if err != nil || cur.Status != "running" {
		t.Fatalf("after the restart: %+v %v", cur, err)
	}
	if res, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "echo", Args: []string{"after"}}); err != nil || string(res.Stdout) != "after\n" {
		t.Fatalf("exec after the restart: %q %v", res.Stdout, err)
	}
	if _, err := c.DestroyCapsule(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	s.nothingLeft()
}
