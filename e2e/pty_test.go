package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ptyRun is the wrenn CLI on a real pseudo-terminal, as a person at a
// terminal runs it: raw mode, window size and SIGWINCH all real.
type ptyRun struct {
	t      *testing.T
	master *os.File
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer
	done   chan struct{}
}

// openPTY returns a pseudo-terminal's master and the path of its slave.
func openPTY(t *testing.T) (*os.File, string) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open /dev/ptmx: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlock pty: %v", err)
	}
	n, err := unix.IoctlGetInt(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("pty number: %v", err)
	}
	return master, fmt.Sprintf("/dev/pts/%d", n)
}

func setSize(t *testing.T, f *os.File, cols, rows int) {
	t.Helper()
	if err := unix.IoctlSetWinsize(int(f.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Col: uint16(cols), Row: uint16(rows)}); err != nil {
		t.Fatalf("window size: %v", err)
	}
}

// startOnPTY runs the CLI with args on a new terminal of cols x rows that
// is its controlling terminal.
func (c *cli) startOnPTY(cols, rows int, args ...string) *ptyRun {
	t := c.t
	t.Helper()
	master, slavePath := openPTY(t)
	slave, err := os.OpenFile(slavePath, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	setSize(t, master, cols, rows)
	cmd := exec.Command(c.bin, args...)
	cmd.Env = append(append(os.Environ(), "WRENN_CONFIG="+c.config, "WRENN_API_KEY=", "WRENN_URL=", "TERM=xterm"), c.env...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	p := &ptyRun{t: t, master: master, cmd: cmd, done: make(chan struct{})}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			p.mu.Lock()
			p.out.Write(buf[:n])
			p.mu.Unlock()
			if err != nil {
				close(p.done)
				return
			}
		}
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
		master.Close()
	})
	return p
}

// expect waits until the terminal has shown want, and returns all it showed.
func (p *ptyRun) expect(want string) string {
	p.t.Helper()
	got, ok := p.shows(want, time.Minute)
	if !ok {
		p.t.Fatalf("the terminal never showed %q; it showed:\n%s", want, got)
	}
	return got
}

// shows waits up to d for the terminal to have shown want.
func (p *ptyRun) shows(want string, d time.Duration) (string, bool) {
	deadline := time.Now().Add(d)
	for {
		p.mu.Lock()
		got := p.out.String()
		p.mu.Unlock()
		if strings.Contains(got, want) {
			return got, true
		}
		if time.Now().After(deadline) {
			return got, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// keys types on the terminal.
func (p *ptyRun) keys(s string) {
	p.t.Helper()
	if _, err := p.master.Write([]byte(s)); err != nil {
		p.t.Fatal(err)
	}
}

// wait returns the CLI's exit code once it has ended.
func (p *ptyRun) wait() int {
	p.t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- p.cmd.Wait() }()
	select {
	case <-errc:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(time.Minute):
		p.t.Fatalf("the CLI did not end; the terminal showed:\n%s", p.out.String())
		return -1
	}
}

// cooked reports whether the terminal is back in cooked mode (echo and
// line editing on) after the CLI has ended.
func (p *ptyRun) cooked() bool {
	tio, err := unix.IoctlGetTermios(int(p.master.Fd()), unix.TCGETS)
	return err == nil && tio.Lflag&unix.ICANON != 0 && tio.Lflag&unix.ECHO != 0
}
