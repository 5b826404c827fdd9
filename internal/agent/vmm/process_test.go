package vmm

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// With WRENN_FAKE_VMM_SOCKET set the test binary plays a VMM: it notes
// that it ran, then serves its control socket.
func TestMain(m *testing.M) {
	if socket := os.Getenv("WRENN_FAKE_VMM_SOCKET"); socket != "" {
		_ = os.WriteFile(socket+".ran", nil, 0o600)
		ln, err := net.Listen("unix", socket)
		if err != nil {
			os.Exit(1)
		}
		for {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}
	}
	os.Exit(m.Run())
}

// gateChecker is a Confiner that records what the process was when it
// was confined.
type gateChecker struct {
	socket  string
	cmdline string
	ran     bool
	fail    bool
}

func (g *gateChecker) Confine(_ Spec, pid int) error {
	// The exec that Start waited for has closed its close-on-exec pipe a
	// moment before the kernel sets the new program's arguments: until
	// then /proc/<pid>/cmdline reads empty.
	for deadline := time.Now().Add(time.Second); g.cmdline == "" && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		g.cmdline = strings.ReplaceAll(string(b), "\x00", " ")
	}
	time.Sleep(200 * time.Millisecond) // a VMM not held at the gate would have run by now
	_, err := os.Stat(g.socket + ".ran")
	g.ran = err == nil
	if g.fail {
		return errors.New("no cgroup for you")
	}
	return nil
}

// The VMM's program runs only once the process is confined, and not at
// all when confining it fails.
func TestVMMStartsOnlyOnceConfined(t *testing.T) {
	self, _ := os.Executable()
	for _, fail := range []bool{false, true} {
		dir := t.TempDir()
		socket := filepath.Join(dir, "vmm.sock")
		t.Setenv("WRENN_FAKE_VMM_SOCKET", socket)
		g := &gateChecker{socket: socket, fail: fail}
		spec := Spec{ID: "sb-gate", RunDir: filepath.Join(dir, "run")}
		inst, err := StartProcess(context.Background(), spec, []string{self}, socket, StartOptions{Confine: g, KeepPrivileges: true})
		if g.ran || !strings.Contains(g.cmdline, "wrenn-vmm-gate") {
			t.Fatalf("at confinement the process was %q and the VMM had run: %v", g.cmdline, g.ran)
		}
		if fail {
			if err == nil {
				t.Fatal("a VMM that could not be confined was started")
			}
			time.Sleep(200 * time.Millisecond)
			if _, err := os.Stat(socket + ".ran"); err == nil {
				t.Fatal("the VMM ran although confining it failed")
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if !ProcessAlive(inst, "") {
			t.Fatal("the VMM is not alive after its start")
		}
		if err := KillProcess(context.Background(), inst, ""); err != nil {
			t.Fatal(err)
		}
	}
}
