package firecracker

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
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
	h.finish(d.Log, spec.ID, stats, err, time.Since(start), ctx.Err() != nil || goneSoon(err, alive), func(why string) error {
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

// goneSoon reports whether the VMM is gone, or goes within a second,
// after Serve ended with err: a VMM that exits (a pause, a destroy) fails
// the copies into its memory (ESRCH) a moment before its process is seen
// gone, which is not the handler failing.
func goneSoon(err error, alive func() bool) bool {
	if err == nil {
		return !alive()
	}
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if !alive() {
			return true
		}
	}
	return false
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
