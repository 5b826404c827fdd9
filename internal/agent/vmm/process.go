package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// StartProcess starts a VMM in the sandbox's network namespace and in its
// own session, so it outlives an agent restart. Its output goes through
// the console FIFO into the capped RunDir/vmm.log (see ConsoleLog). It
// returns once socket (the VMM's control socket)
// accepts connections, or an error with the log's last lines if the VMM
// exits first. The socket's file alone is not enough: it appears at bind,
// before the VMM listens, and a connection in between is refused.
func StartProcess(ctx context.Context, spec Spec, argv []string, socket string, opts StartOptions) (Instance, error) {
	if err := os.MkdirAll(spec.RunDir, 0o750); err != nil {
		return Instance{}, fmt.Errorf("vmm run dir: %w", err)
	}
	_ = os.Remove(socket)
	if !opts.KeepPrivileges {
		argv = append(dropPrivileges(), argv...)
	}
	if spec.NetNS != "" {
		argv = append([]string{"ip", "netns", "exec", spec.NetNS}, argv...)
	}
	logPath := LogPath(spec.RunDir)
	console, _, err := opts.Console.Open(spec.RunDir)
	if err != nil {
		return Instance{}, fmt.Errorf("vmm log: %w", err)
	}
	defer console.Close() // the VMM holds its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = console, console
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return Instance{}, fmt.Errorf("start %s: %w", argv[0], err)
	}
	inst := Instance{PID: cmd.Process.Pid}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait() // reap it while this agent lives
		close(exited)
	}()
	if opts.Confine != nil {
		if err := opts.Confine.Confine(spec, inst.PID); err != nil {
			_ = syscall.Kill(inst.PID, syscall.SIGKILL)
			<-exited
			return Instance{}, fmt.Errorf("confine vmm: %w", err)
		}
	}
	waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return inst, nil
		}
		select {
		case <-exited:
			return Instance{}, fmt.Errorf("vmm exited at start: %s", LogTail(logPath, 5))
		case <-waitCtx.Done():
			_ = syscall.Kill(inst.PID, syscall.SIGKILL)
			return Instance{}, fmt.Errorf("vmm did not open %s: %w", socket, waitCtx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// StartOptions say how a VMM process starts.
type StartOptions struct {
	// Confine, when set, places the process under its limits first; if
	// that fails the VMM is killed: it never runs unconfined.
	Confine Confiner
	// Console says how much of the VMM's output is kept.
	Console ConsoleLog
	// KeepPrivileges lets the process keep the agent's capabilities (the
	// Firecracker jailer needs them to build its jail and drops them
	// itself). Otherwise the VMM starts with none.
	KeepPrivileges bool
}

// dropPrivileges is the prefix that starts a VMM with no capabilities and
// no way to gain any (no_new_privs): a VMM needs none, since the agent
// makes its TAP device owned by the agent's user. An agent running as root
// also clears the bounding set, so even a root VMM holds no capability.
func dropPrivileges() []string {
	argv := []string{"setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs"}
	if os.Geteuid() == 0 {
		argv = append(argv, "--bounding-set=-all")
	}
	return append(argv, "--")
}

// ProcessAlive reports whether pid runs and its command line contains
// marker (pids are reused, so the pid alone proves nothing).
func ProcessAlive(pid int, marker string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || isZombie(pid) {
		return false
	}
	return strings.Contains(string(cmdline), marker)
}

// KillProcess kills pid if it is still the VMM (see ProcessAlive) and
// waits until it is gone.
func KillProcess(ctx context.Context, pid int, marker string) error {
	if !ProcessAlive(pid, marker) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill vmm %d: %w", pid, err)
	}
	return WaitGone(ctx, pid)
}

// WaitGone waits until pid has exited (a zombie counts as exited).
func WaitGone(ctx context.Context, pid int) error {
	for {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) || isZombie(pid) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vmm %d still running: %w", pid, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func isZombie(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}
