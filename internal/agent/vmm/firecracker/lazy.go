package firecracker

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/firecracker/uffd"
)

// uffdHandler is one lazily restored VM's page-fault handler. It listens
// before the VM's Firecracker starts, then serves it until every page is
// in or the VMM is gone; there is no other deadline. If it fails, pages
// not yet in would hang the guest for good while it looks running, so the
// VM is ended and the reason recorded for the sandbox's error.
type uffdHandler struct {
	ln      *net.UnixListener
	memFile string
	vmPath  string // the socket as the VMM names it
}

// aliveEvery is how often a handler looks whether its VMM still runs.
const aliveEvery = 500 * time.Millisecond

func (d *Driver) listenUFFD(spec vmm.Spec, memFile string) (*uffdHandler, error) {
	l := d.launcher()
	host, vmPath := l.uffdSocket(spec)
	if err := os.MkdirAll(filepath.Dir(host), 0o750); err != nil {
		return nil, err
	}
	ln, err := uffd.Listen(host)
	if err != nil {
		return nil, err
	}
	if err := l.grant(spec, host); err != nil { // the VMM's user connects to it
		ln.Close()
		return nil, err
	}
	return &uffdHandler{ln: ln, memFile: memFile, vmPath: vmPath}, nil
}

// abandon closes a handler whose VMM never started; nil is none.
func (h *uffdHandler) abandon() {
	if h != nil {
		h.ln.Close()
	}
}

// serve runs the handler for inst, the VM's VMM: in a process of its own
// when the driver names a handler program (it outlives the agent), else
// here.
func (h *uffdHandler) serve(d *Driver, spec vmm.Spec, inst vmm.Instance) {
	if d.UFFDHandler != "" {
		err := h.spawn(d, spec, inst)
		if err == nil {
			return
		}
		d.Log.Warn("cannot start the uffd handler process; serving the VM's memory from the agent", "sandbox", spec.ID, "error", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	alive := func() bool { return d.Alive(spec, inst) }
	go watchVMM(ctx, cancel, alive)
	start := time.Now()
	stats, err := uffd.Serve(ctx, h.ln, h.memFile, true)
	h.finish(d.Log, spec.ID, stats, err, time.Since(start), ctx.Err() != nil || !alive(), func(why string) error {
		if rerr := vmm.RecordExitReason(spec.RunDir, why); rerr != nil {
			d.Log.Warn("cannot record why the VM ended", "sandbox", spec.ID, "error", rerr)
		}
		stopCtx, stop := context.WithTimeout(context.Background(), 30*time.Second)
		defer stop()
		return d.Stop(stopCtx, spec, inst)
	})
}

// watchVMM cancels a handler's work once its VMM is gone.
func watchVMM(ctx context.Context, cancel func(), alive func() bool) {
	t := time.NewTicker(aliveEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if !alive() {
				cancel()
				return
			}
		}
	}
}

// finish logs how a handler ended and, if it failed while its VMM ran,
// ends the VM (whose untouched pages would hang it) with end, which also
// records why.
func (h *uffdHandler) finish(log *slog.Logger, id string, stats uffd.Stats, err error, took time.Duration, vmmGone bool, end func(why string) error) {
	switch {
	case err == nil:
		log.Info("uffd handler done: every page is in", "sandbox", id, "faults", stats.Faults, "prefetched", stats.Prefetched, "took", took.Round(time.Millisecond))
	case vmmGone:
		// A VMM that exits (a pause, a destroy) makes copies fail (ESRCH)
		// before the watcher sees it gone: not the handler's fault.
		log.Info("uffd handler ended with its VMM", "sandbox", id, "faults", stats.Faults, "prefetched", stats.Prefetched)
	default:
		log.Error("uffd handler failed: ending the VM, whose untouched pages would hang it", "sandbox", id, "error", err)
		if eerr := end("its memory could not be served from the snapshot (lazy restore): " + err.Error()); eerr != nil {
			log.Error("cannot end the VM after its uffd handler failed", "sandbox", id, "error", eerr)
		}
	}
}

// handlerPIDFile, in a VM's RunDir, names its handler process;
// handlerStateFile says "serving" until the handler has finished (every
// page in, its VMM gone, or the VM ended for its failure): "ended".
const (
	handlerPIDFile   = "uffd-handler.pid"
	handlerStateFile = "uffd-handler.state"
	stateServing     = "serving"
	stateEnded       = "ended"
)

// start starts the handler process for inst. It runs as the VMM's own
// uid and gid with no capability and an empty environment: it reads what
// the VMM sends (untrusted, should the guest have taken the VMM over), so
// it gets nothing the VMM does not hold already, and being the VMM's
// user lets it end the VMM. It is given what it needs open: the
// listening socket (fd 3; this process keeps no copy), the memory file
// (fd 4) and the VM's exit-reason file (fd 5). Its log is
// uffd-handler.log in the VM's RunDir.
func (h *uffdHandler) start(d *Driver, spec vmm.Spec, inst vmm.Instance) (*exec.Cmd, error) {
	uid, gid, err := d.launcher().ids(spec)
	if err != nil {
		return nil, err
	}
	sock, err := h.ln.File()
	if err != nil {
		return nil, err
	}
	defer sock.Close()
	mem, err := os.Open(h.memFile)
	if err != nil {
		return nil, err
	}
	defer mem.Close()
	reason, err := os.OpenFile(filepath.Join(spec.RunDir, vmm.ExitReasonFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer reason.Close()
	state, err := os.OpenFile(filepath.Join(spec.RunDir, handlerStateFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer state.Close()
	if _, err := state.WriteString(stateServing); err != nil {
		return nil, err
	}
	logPath := filepath.Join(spec.RunDir, "uffd-handler.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	argv := []string{d.UFFDHandler, "uffd-handler", "--id", spec.ID,
		"--vmm-pid", strconv.Itoa(inst.PID), "--vmm-start", strconv.FormatUint(inst.Start, 10)}
	if uid == os.Geteuid() && gid == os.Getegid() {
		argv = append(vmm.Unprivileged(uid, gid), argv...)
	} else {
		// Another user (a jail's) may not reach the agent's binary: it
		// starts as the agent and becomes that user before it reads
		// anything (see becomeUser).
		argv = append(argv, "--uid", strconv.Itoa(uid), "--gid", strconv.Itoa(gid))
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, err
	}
	// In the VM's run directory: what it leaves is known by that.
	cmd := &exec.Cmd{Path: path, Args: argv, Env: []string{}, Dir: spec.RunDir}
	cmd.ExtraFiles = []*os.File{sock, mem, reason, state}
	cmd.Stdout, cmd.Stderr = logf, logf
	// A session of its own: signals to the agent's process group (a
	// terminal's Ctrl-C, a service stop) do not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(spec.RunDir, handlerPIDFile), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600); err != nil {
		d.Log.Warn("cannot note the uffd handler's pid", "sandbox", spec.ID, "error", err)
	}
	// The socket file stays for the VMM to connect to: the handler has it.
	h.ln.SetUnlinkOnClose(false)
	h.ln.Close()
	d.Log.Info("uffd handler process started", "sandbox", spec.ID, "pid", cmd.Process.Pid, "uid", uid)
	return cmd, nil
}

// spawn starts the handler process and watches it: should it die while
// its VM runs, the VM is ended with the reason.
func (h *uffdHandler) spawn(d *Driver, spec vmm.Spec, inst vmm.Instance) error {
	cmd, err := h.start(d, spec, inst)
	if err != nil {
		return err
	}
	go func() {
		err := cmd.Wait()
		if err == nil || !d.Alive(spec, inst) {
			return // done, or it ended the VM itself, or the VM went first
		}
		// It died (killed, out of memory) while its VM runs: pages not in
		// yet would hang the guest for good.
		d.handlerDied(spec, inst, fmt.Sprintf("its memory's page-fault handler (pid %d) ended while it ran (%v): %s",
			cmd.Process.Pid, err, vmm.LogTail(filepath.Join(spec.RunDir, "uffd-handler.log"), 2)))
	}()
	return nil
}

// handlerDied ends a VM whose page-fault handler is gone before its work.
func (d *Driver) handlerDied(spec vmm.Spec, inst vmm.Instance, why string) {
	d.Log.Error("uffd handler process died: ending the VM, whose untouched pages would hang it", "sandbox", spec.ID, "reason", why)
	if err := vmm.RecordExitReason(spec.RunDir, why); err != nil {
		d.Log.Warn("cannot record why the VM ended", "sandbox", spec.ID, "error", err)
	}
	stopCtx, stop := context.WithTimeout(context.Background(), 30*time.Second)
	defer stop()
	if err := d.Stop(stopCtx, spec, inst); err != nil {
		d.Log.Error("cannot end the VM after its uffd handler died", "sandbox", spec.ID, "error", err)
	}
}

// Adopt implements vmm.Adopter: a VM restored lazily by the agent before
// this one may still have its handler process at work. It is watched as
// that agent would have: should it go before it has finished, the VM is
// ended with the reason.
func (d *Driver) Adopt(spec vmm.Spec, inst vmm.Instance) {
	if handlerState(spec) != stateServing {
		return // none, or done
	}
	raw, _ := os.ReadFile(filepath.Join(spec.RunDir, handlerPIDFile))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(raw)))
	go func() {
		for handlerRuns(pid, spec.ID) {
			time.Sleep(aliveEvery)
		}
		if handlerState(spec) == stateServing && d.Alive(spec, inst) {
			d.handlerDied(spec, inst, fmt.Sprintf("its memory's page-fault handler (pid %d) ended before every page was in, while no agent watched it", pid))
		}
	}()
}

func handlerState(spec vmm.Spec) string {
	b, _ := os.ReadFile(filepath.Join(spec.RunDir, handlerStateFile))
	return strings.TrimSpace(string(b))
}

// handlerRuns reports whether pid is the handler process of sandbox id.
func handlerRuns(pid int, id string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !vmm.ProcessAlive(vmm.Instance{PID: pid}, "") {
		return false
	}
	args := strings.Split(string(cmdline), "\x00")
	return slices.Contains(args, "uffd-handler") && strings.Contains(string(cmdline), "\x00--id\x00"+id+"\x00")
}

// HandlerMain is the uffd handler process ("uffd-handler" arguments; the
// listening socket, the memory file and the exit-reason file on fds 3-5):
// it serves the VM's memory until every page is in or its VMM is gone.
// If it fails while the VMM runs, it records why and kills the VMM, as
// the in-agent handler does. It returns the process's exit code.
func HandlerMain(args []string) int {
	fs := flag.NewFlagSet("uffd-handler", flag.ContinueOnError)
	id := fs.String("id", "", "sandbox id")
	pid := fs.Int("vmm-pid", 0, "the VMM's pid")
	start := fs.Uint64("vmm-start", 0, "the VMM's start time, in clock ticks after boot")
	uid := fs.Int("uid", -1, "become this user (the VMM's) first")
	gid := fs.Int("gid", -1, "and this group")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if *id == "" || *pid <= 0 || *start == 0 {
		log.Error("uffd-handler: --id, --vmm-pid and --vmm-start are required")
		return 2
	}
	if *uid >= 0 {
		if err := becomeUser(*uid, *gid); err != nil {
			log.Error("uffd-handler: cannot become the VMM's user", "uid", *uid, "gid", *gid, "error", err)
			return 2
		}
	}
	sock, mem, reason, state := os.NewFile(3, "uffd socket"), os.NewFile(4, "memory file"), os.NewFile(5, "exit reason"), os.NewFile(6, "state")
	if sock == nil || mem == nil || reason == nil || state == nil {
		log.Error("uffd-handler: fds 3-6 (socket, memory file, exit reason, state) are required")
		return 2
	}
	defer mem.Close()
	defer reason.Close()
	defer state.Close()
	l, err := net.FileListener(sock)
	sock.Close()
	ln, ok := l.(*net.UnixListener)
	if err != nil || !ok {
		log.Error("uffd-handler: fd 3 is not a listening unix socket", "error", err)
		return 2
	}
	inst := vmm.Instance{PID: *pid, Start: *start}
	alive := func() bool { return vmm.ProcessAlive(inst, "") }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go watchVMM(ctx, cancel, alive)
	begin := time.Now()
	stats, err := uffd.ServeFile(ctx, ln, mem, true)
	gone := ctx.Err() != nil || !alive()
	h := &uffdHandler{}
	h.finish(log, *id, stats, err, time.Since(begin), gone, func(why string) error {
		if _, werr := reason.WriteAt([]byte(why), 0); werr != nil {
			log.Warn("cannot record why the VM ended", "sandbox", *id, "error", werr)
		}
		killCtx, stop := context.WithTimeout(context.Background(), 30*time.Second)
		defer stop()
		return vmm.KillProcess(killCtx, inst, "")
	})
	// Done, one way or another: an agent watching it from now on (after a
	// restart) has nothing to do when it goes.
	if terr := state.Truncate(0); terr == nil {
		_, _ = state.WriteAt([]byte(stateEnded), 0)
	}
	if err != nil && !gone {
		return 1
	}
	return 0
}

// becomeUser makes this process uid:gid with no supplementary group, no
// capability (the kernel clears them as root's uid goes) and no way to
// gain any (no_new_privs), and checks that it holds none.
func becomeUser(uid, gid int) error {
	if uid <= 0 || gid <= 0 {
		return fmt.Errorf("uid %d, gid %d: want a user other than root", uid, gid)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	if err := syscall.Setgroups(nil); err != nil {
		return err
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return err
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return err
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err
	}
	for _, field := range []string{"CapPrm:", "CapEff:", "CapAmb:"} {
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, field); ok && strings.Trim(strings.TrimSpace(v), "0") != "" {
				return fmt.Errorf("still holds capabilities: %s", line)
			}
		}
	}
	return nil
}

// CheckLazyMemory says why this host cannot restore lazily (nil when it
// can). Firecracker, which runs without capabilities, makes its
// userfaultfd through /dev/userfaultfd (Linux 6.1+; the jailer makes the
// node in each jail) or, without it, needs vm.unprivileged_userfaultfd=1.
func (d *Driver) CheckLazyMemory() error {
	if b, err := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); err == nil && strings.TrimSpace(string(b)) == "1" {
		return nil
	}
	const dev = "/dev/userfaultfd"
	fi, err := os.Stat(dev)
	if err != nil {
		return fmt.Errorf("--lazy-memory needs %s (Linux 6.1+) or vm.unprivileged_userfaultfd=1: %w", dev, err)
	}
	if fi.Mode()&os.ModeCharDevice == 0 {
		return fmt.Errorf("--lazy-memory: %s is not a character device", dev)
	}
	if d.Jailer != nil {
		return nil // the jailer gives each jail a node of its own, owned by the VM's user
	}
	// A direct Firecracker runs as the agent's user with no capabilities,
	// so only the node's mode counts (access(2) would let root through).
	st := fi.Sys().(*syscall.Stat_t)
	perm := fi.Mode().Perm()
	ok := perm&0o006 == 0o006 || int(st.Uid) == os.Geteuid() && perm&0o600 == 0o600
	if !ok && os.Geteuid() != 0 {
		ok = unix.Access(dev, unix.R_OK|unix.W_OK) == nil // group or ACL
	}
	if !ok {
		return fmt.Errorf("--lazy-memory: a Firecracker running as uid %d without capabilities cannot open %s (%v, owner %d): give it access (setfacl -m u:%d:rw %s) or set vm.unprivileged_userfaultfd=1",
			os.Geteuid(), dev, perm, st.Uid, os.Geteuid(), dev)
	}
	return nil
}
