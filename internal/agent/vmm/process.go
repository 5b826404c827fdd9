package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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
	_ = os.Remove(filepath.Join(spec.RunDir, ExitReasonFile)) // a reason belongs to one process
	if !opts.KeepPrivileges {
		argv = append(dropPrivileges(), argv...)
	}
	if spec.NetNS != "" {
		argv = append([]string{"ip", "netns", "exec", spec.NetNS}, argv...)
	}
	var gate *os.File // written once the process is confined
	var gateRead *os.File
	if opts.Confine != nil {
		// The process waits at a gate until it is in its cgroup, so the VMM
		// runs (and allocates guest memory) only under its limits: a shell
		// that execs the VMM, same pid, once it reads "go" on fd 3.
		var err error
		if gateRead, gate, err = os.Pipe(); err != nil {
			return Instance{}, fmt.Errorf("vmm gate: %w", err)
		}
		defer gateRead.Close()
		defer gate.Close()
		argv = append([]string{"/bin/sh", "-c", `IFS= read -r go <&3 && [ "$go" = go ] && exec "$@" 3<&-; exit 126`, "wrenn-vmm-gate"}, argv...)
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
	if gateRead != nil {
		cmd.ExtraFiles = []*os.File{gateRead}
	}
	if err := cmd.Start(); err != nil {
		return Instance{}, fmt.Errorf("start %s: %w", argv[0], err)
	}
	inst := Instance{PID: cmd.Process.Pid}
	inst.Start, _ = ProcessStart(inst.PID)
	exited := make(chan struct{})
	var exitErr error
	go func() {
		exitErr = cmd.Wait() // reap it while this agent lives
		close(exited)
	}()
	if opts.Confine != nil {
		if err := opts.Confine.Confine(spec, inst.PID); err != nil {
			_ = syscall.Kill(inst.PID, syscall.SIGKILL)
			<-exited
			return Instance{}, fmt.Errorf("confine vmm: %w", err)
		}
		if _, err := gate.WriteString("go\n"); err != nil {
			_ = syscall.Kill(inst.PID, syscall.SIGKILL)
			<-exited
			return Instance{}, fmt.Errorf("start the confined vmm: %w", err)
		}
	}
	waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	gone := exited
	if opts.PIDFile != "" {
		// A launcher: it exits once the VMM it started runs, which is the
		// process to track from then on.
		select {
		case <-exited:
		case <-waitCtx.Done():
			_ = syscall.Kill(inst.PID, syscall.SIGKILL)
			return Instance{}, fmt.Errorf("%s did not start the vmm: %w", argv[0], waitCtx.Err())
		}
		if exitErr != nil {
			return Instance{}, fmt.Errorf("%s: %v: %s", argv[0], exitErr, LogTail(logPath, 5))
		}
		if inst, err = ReadPIDFile(opts.PIDFile); err != nil {
			return Instance{}, fmt.Errorf("%s exited without a running vmm: %w: %s", argv[0], err, LogTail(logPath, 5))
		}
		gone = nil // the VMM is not this agent's child: look at it instead
	}
	for {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return inst, nil
		}
		if opts.PIDFile != "" && !ProcessAlive(inst, "") {
			return Instance{}, fmt.Errorf("vmm exited at start: %s", lastWords(logPath))
		}
		select {
		case <-gone:
			return Instance{}, fmt.Errorf("vmm exited at start: %s", lastWords(logPath))
		case <-waitCtx.Done():
			_ = syscall.Kill(inst.PID, syscall.SIGKILL)
			return Instance{}, fmt.Errorf("vmm did not open %s: %w", socket, waitCtx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// lastWords is the end of the log of a VMM that just exited. What it
// wrote reaches the log through the console's reader a moment later, so
// an empty log is read again for a little while before it is believed.
func lastWords(logPath string) string {
	for range 25 {
		if tail := LogTail(logPath, 5); tail != "" {
			return tail
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "(it wrote nothing)"
}

// ReadPIDFile reads the pid a launcher wrote and names that process.
func ReadPIDFile(path string) (Instance, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Instance{}, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:min(len(b), 32)])))
	if err != nil || pid <= 0 {
		return Instance{}, fmt.Errorf("pid file %s holds %q", path, b[:min(len(b), 32)])
	}
	start, err := ProcessStart(pid)
	if err != nil {
		return Instance{}, fmt.Errorf("vmm pid %d from %s: %w", pid, path, err)
	}
	return Instance{PID: pid, Start: start}, nil
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
	// PIDFile, when set, makes the process a launcher (Firecracker's
	// jailer with --new-pid-ns): it exits with status 0 once the VMM runs,
	// having written the VMM's pid to this file, and that pid is tracked.
	PIDFile string
}

// dropPrivileges is the prefix that starts a VMM with no capabilities and
// no way to gain any (no_new_privs): a VMM needs none, since the agent
// makes its TAP device owned by the agent's user. An agent running as root
// also clears the bounding set, so even a root VMM holds no capability.
func dropPrivileges() []string { return Unprivileged(os.Geteuid(), os.Getegid()) }

// Unprivileged is the prefix that starts a program as uid:gid (no
// supplementary groups when that changes them) with no capability and
// no_new_privs.
func Unprivileged(uid, gid int) []string {
	argv := []string{"setpriv"}
	if uid != os.Geteuid() || gid != os.Getegid() {
		argv = append(argv, "--reuid="+strconv.Itoa(uid), "--regid="+strconv.Itoa(gid), "--clear-groups")
	}
	argv = append(argv, "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs")
	if os.Geteuid() == 0 {
		argv = append(argv, "--bounding-set=-all")
	}
	return append(argv, "--")
}

// ProcessAlive reports whether inst's process still runs: its pid, with
// the start time recorded when it started (pids are reused, start times
// after boot are not), and a command line containing marker. Instances
// recorded without a start time are known by the marker alone.
func ProcessAlive(inst Instance, marker string) bool {
	if inst.PID <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", inst.PID))
	if err != nil || isZombie(inst.PID) {
		return false
	}
	if inst.Start != 0 {
		if start, err := ProcessStart(inst.PID); err != nil || start != inst.Start {
			return false
		}
	}
	return strings.Contains(string(cmdline), marker)
}

// ProcessStart is when pid started, in clock ticks after boot (field 22
// of /proc/<pid>/stat): with the pid, it names one process for good.
func ProcessStart(pid int) (uint64, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// fields from after its closing parenthesis, which is field 3's start.
	i := strings.LastIndexByte(string(stat), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// KillProcess kills inst if it is still the VMM (see ProcessAlive) and
// waits until it is gone.
func KillProcess(ctx context.Context, inst Instance, marker string) error {
	if !ProcessAlive(inst, marker) {
		return nil
	}
	if err := syscall.Kill(inst.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill vmm %d: %w", inst.PID, err)
	}
	return WaitGone(ctx, inst.PID)
}

// ExitReasonFile, in a VM's RunDir, says why the agent ended its VMM.
const ExitReasonFile = "vmm-exit-reason"

// RecordExitReason notes why the agent is ending a VM's VMM on its own
// (not at a caller's request), for the sandbox's error.
func RecordExitReason(runDir, reason string) error {
	return os.WriteFile(filepath.Join(runDir, ExitReasonFile), []byte(reason), 0o600)
}

// ExitReason is what RecordExitReason noted in runDir, or "".
func ExitReason(runDir string) string {
	b, err := os.ReadFile(filepath.Join(runDir, ExitReasonFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b[:min(len(b), 1024)]))
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
