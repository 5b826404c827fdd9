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
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/firecracker/uffd"
)

// The handler process of a lazily restored VM ("wrenn-agent uffd-handler")
// serves its page faults apart from the agent, so that an agent restart
// strands none. Its state file, in the VM's RunDir, is written by the
// handler: "serving <its pid> <its start> <VMM pid> <VMM start>" once it
// runs, "ended" once it has finished (every page in, its VMM gone, or the
// VM ended for its failure). A handler that goes while its state still
// says serving, for the VMM that runs, died at its work.
const (
	handlerStateFile = "uffd-handler.state"
	handlerLogFile   = "uffd-handler.log"
	stateServing     = "serving"
	stateEnded       = "ended"
)

// Descriptors the handler is given, in this order from fd 3.
const (
	fdSocket = 3 + iota
	fdMemory
	fdReason
	fdState
	fdProgram
)

// handlerStatus is what a state file says.
type handlerStatus struct {
	serving bool
	handler vmm.Instance
	vmm     vmm.Instance
}

func readHandlerState(spec vmm.Spec) handlerStatus {
	b, _ := os.ReadFile(filepath.Join(spec.RunDir, handlerStateFile))
	f := strings.Fields(string(b))
	if len(f) != 5 || f[0] != stateServing {
		return handlerStatus{}
	}
	n := make([]uint64, 4)
	for i := range n {
		v, err := strconv.ParseUint(f[i+1], 10, 63)
		if err != nil {
			return handlerStatus{}
		}
		n[i] = v
	}
	return handlerStatus{serving: true, handler: vmm.Instance{PID: int(n[0]), Start: n[1]}, vmm: vmm.Instance{PID: int(n[2]), Start: n[3]}}
}

// handlerRuns reports whether h is still the handler process of sandbox id.
func handlerRuns(h vmm.Instance, id string) bool {
	if h.PID <= 0 || h.Start == 0 || !vmm.ProcessAlive(h, "uffd-handler") {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", h.PID))
	return err == nil && strings.Contains(string(cmdline), "\x00--id\x00"+id+"\x00")
}

// start starts the handler process for inst. It runs as the VMM's own uid
// and gid, with no capability, no_new_privs and an empty environment: it
// reads what the VMM sends (untrusted, should the guest have taken the
// VMM over), so it holds nothing the VMM does not, and being the VMM's
// user lets it end the VMM. It is given what it needs open: the listening
// socket (this process keeps no copy), the memory file, the VM's
// exit-reason file, a fresh state file, and its own program, which it is
// run from (/proc/self/fd/N: a jail's user may not reach the agent's
// binary by its path).
func (h *uffdHandler) start(d *Driver, spec vmm.Spec, inst vmm.Instance) (*exec.Cmd, error) {
	uid, gid, err := d.launcher().ids(spec)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	open := func(path string, flag int) error {
		f, err := os.OpenFile(path, flag, 0o600)
		if err == nil {
			files = append(files, f)
		}
		return err
	}
	sock, err := h.ln.File()
	if err != nil {
		return nil, err
	}
	files = append(files, sock)
	statePath := filepath.Join(spec.RunDir, handlerStateFile)
	// A new file for each handler: one still ending from before must not
	// write over this one's state.
	if err := os.Remove(statePath); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	for _, f := range []struct {
		path string
		flag int
	}{
		{h.memFile, os.O_RDONLY},
		{filepath.Join(spec.RunDir, vmm.ExitReasonFile), os.O_CREATE | os.O_WRONLY | os.O_TRUNC},
		{statePath, os.O_CREATE | os.O_EXCL | os.O_WRONLY},
		{d.UFFDHandler, os.O_RDONLY},
	} {
		if err := open(f.path, f.flag); err != nil {
			return nil, err
		}
	}
	logf, err := os.OpenFile(filepath.Join(spec.RunDir, handlerLogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	argv := append(vmm.Unprivileged(uid, gid), fmt.Sprintf("/proc/self/fd/%d", fdProgram), "uffd-handler", "--id", spec.ID,
		"--vmm-pid", strconv.Itoa(inst.PID), "--vmm-start", strconv.FormatUint(inst.Start, 10))
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, err
	}
	// In the VM's run directory: what it leaves is known by that.
	cmd := &exec.Cmd{Path: path, Args: argv, Env: []string{}, Dir: spec.RunDir, ExtraFiles: files}
	cmd.Stdout, cmd.Stderr = logf, logf
	// A session of its own: signals to the agent's process group (a
	// terminal's Ctrl-C, a service stop) do not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
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
			cmd.Process.Pid, err, vmm.LogTail(filepath.Join(spec.RunDir, handlerLogFile), 2)))
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

// stopHandler ends the VM's handler process, if one still serves: a VM
// that stops takes its handler with it at once (a jail's uid is handed on
// only when nothing runs as it).
func stopHandler(ctx context.Context, spec vmm.Spec) error {
	st := readHandlerState(spec)
	if !st.serving || !handlerRuns(st.handler, spec.ID) {
		return nil
	}
	return vmm.KillProcess(ctx, st.handler, "uffd-handler")
}

// Adopt implements vmm.Adopter: a VM restored lazily by the agent before
// this one may still have its handler process at work. It is watched as
// that agent would have: should it go before it has finished, the VM is
// ended with the reason.
func (d *Driver) Adopt(spec vmm.Spec, inst vmm.Instance) {
	st := readHandlerState(spec)
	if !st.serving || st.vmm != inst {
		return // none, done, or another VMM's
	}
	go func() {
		for handlerRuns(st.handler, spec.ID) {
			time.Sleep(aliveEvery)
		}
		if now := readHandlerState(spec); now.serving && now.handler == st.handler && d.Alive(spec, inst) {
			d.handlerDied(spec, inst, fmt.Sprintf("its memory's page-fault handler (pid %d) ended before every page was in, while no agent watched it", st.handler.PID))
		}
	}()
}

// HandlerMain is the handler process ("uffd-handler" arguments, the files
// of start from fd 3): it serves the VM's memory until every page is in
// or its VMM is gone. If it fails while the VMM runs, it records why and
// kills the VMM, as the in-agent handler does. It returns the process's
// exit code.
func HandlerMain(args []string) int {
	fs := flag.NewFlagSet("uffd-handler", flag.ContinueOnError)
	id := fs.String("id", "", "sandbox id")
	pid := fs.Int("vmm-pid", 0, "the VMM's pid")
	start := fs.Uint64("vmm-start", 0, "the VMM's start time, in clock ticks after boot")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if *id == "" || *pid <= 0 || *start == 0 {
		log.Error("uffd-handler: --id, --vmm-pid and --vmm-start are required")
		return 2
	}
	for fd := fdSocket; fd <= fdProgram; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			log.Error("uffd-handler: fds 3-7 (socket, memory file, exit reason, state, program) are required", "fd", fd, "error", err)
			return 2
		}
	}
	_ = unix.Close(fdProgram) // what it was run from
	sock, mem := os.NewFile(fdSocket, "uffd socket"), os.NewFile(fdMemory, "memory file")
	reason, state := os.NewFile(fdReason, "exit reason"), os.NewFile(fdState, "state")
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
	self, err := vmm.ProcessStart(os.Getpid())
	if err != nil {
		log.Error("uffd-handler: its own start time", "error", err)
		return 2
	}
	if _, err := fmt.Fprintf(state, "%s %d %d %d %d\n", stateServing, os.Getpid(), self, *pid, *start); err != nil {
		log.Warn("uffd-handler: cannot write its state", "error", err)
	}
	inst := vmm.Instance{PID: *pid, Start: *start}
	alive := func() bool { return vmm.ProcessAlive(inst, "") }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go watchVMM(ctx, cancel, alive)
	begin := time.Now()
	stats, err := uffd.ServeFile(ctx, ln, mem, true)
	gone := ctx.Err() != nil || goneSoon(err, alive)
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
