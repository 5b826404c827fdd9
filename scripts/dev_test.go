package scripts

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	"github.com/wrenn/wrenn/internal/testutil/hostlock"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// devRun is one `scripts/dev.sh up` in the background.
type devRun struct {
	cmd    *exec.Cmd
	lines  chan string
	output strings.Builder
}

func startDev(t *testing.T, env []string) *devRun {
	cmd := exec.Command("bash", "dev.sh", "up")
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &devRun{cmd: cmd, lines: make(chan string, 1000)}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			d.lines <- sc.Text()
		}
		close(d.lines)
	}()
	go func() { _ = cmd.Wait(); pw.Close() }()
	return d
}

// waitFor reads output until a line holds want.
func (d *devRun) waitFor(t *testing.T, want string, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case line, ok := <-d.lines:
			if !ok {
				t.Fatalf("dev.sh ended before %q:\n%s", want, d.output.String())
			}
			d.output.WriteString(line + "\n")
			if strings.Contains(line, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %q within %s:\n%s", want, within, d.output.String())
		}
	}
}

// make dev, as a newcomer runs it: everything comes up, the CLI is signed
// in and a smoke capsule says hello; Ctrl-C (here SIGTERM) pauses a
// running capsule and stops everything; the second start reuses the
// agent's registration and the capsule is still there to resume.
func TestMakeDev(t *testing.T) {
	requireRoot(t)
	agentDir := guestimages.AgentDir(t)
	hostlock.Take(t)
	work := t.TempDir()
	cpAddr := "127.0.0.1:" + freeport.Get(t)
	env := []string{
		"WRENN_DEV_DIR=" + filepath.Join(work, "dev"), "WRENN_DIR=" + agentDir, "WRENN_DEV_SKIP_IMAGES=1",
		"WRENN_MEMORY_TEMPLATES=", // the shared images stay as they are
		"WRENN_WARM_POOLS=",
		"DATABASE_URL=" + pgtest.URL(t), "WRENN_CP_LISTEN_ADDR=" + cpAddr, "WRENN_CP_URL=http://" + cpAddr,
		"WRENN_HOST_LISTEN_ADDR=127.0.0.1:" + freeport.Get(t), "WRENN_SLOTS=3001-4000",
		"WRENN_CONFIG=" + filepath.Join(work, "cli.json"), "WRENN_API_KEY=", "WRENN_URL=",
	}
	cli := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("../builds/wrenn", args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("wrenn %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	t.Cleanup(func() {
		down := exec.Command("bash", "dev.sh", "down")
		down.Env = append(os.Environ(), env...)
		_, _ = down.CombinedOutput()
	})

	first := startDev(t, env)
	first.waitFor(t, "hello from wrenn", 10*time.Minute)
	first.waitFor(t, "Wrenn is running", time.Minute)
	if out := cli("sandbox", "create", "--memory", "256", "--metadata", "kept=yes"); !strings.Contains(out, "running") {
		t.Fatalf("create with the signed-in CLI:\n%s", out)
	}
	_ = syscall.Kill(-first.cmd.Process.Pid, syscall.SIGTERM)
	first.waitFor(t, "pausing sb-", time.Minute)
	first.waitFor(t, "stopped", time.Minute)

	started := time.Now()
	second := startDev(t, env)
	second.waitFor(t, "reusing its registration", 5*time.Minute)
	second.waitFor(t, "Wrenn is running", 2*time.Minute)
	t.Logf("second start took %s", time.Since(started).Round(time.Second))
	out := cli("sandbox", "list", "-m", "kept=yes", "--json")
	if !strings.Contains(out, `"status": "paused"`) {
		t.Fatalf("the capsule running at Ctrl-C is not paused:\n%s", out)
	}
	_ = syscall.Kill(-second.cmd.Process.Pid, syscall.SIGTERM)
	second.waitFor(t, "stopped", time.Minute)
}
