package firecracker

import (
	"context"
	"fmt"
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

// serve runs the handler for inst, the VM's VMM.
func (h *uffdHandler) serve(d *Driver, spec vmm.Spec, inst vmm.Instance) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		t := time.NewTicker(aliveEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if !d.Alive(spec, inst) {
					cancel()
					return
				}
			}
		}
	}()
	start := time.Now()
	stats, err := uffd.Serve(ctx, h.ln, h.memFile, true)
	switch {
	case err == nil:
		d.Log.Info("uffd handler done: every page is in", "sandbox", spec.ID, "faults", stats.Faults, "prefetched", stats.Prefetched, "took", time.Since(start).Round(time.Millisecond))
	case ctx.Err() != nil || !d.Alive(spec, inst):
		// A VMM that exits (a pause, a destroy) makes copies fail (ESRCH)
		// before the watcher above sees it gone: not the handler's fault.
		d.Log.Info("uffd handler ended with its VMM", "sandbox", spec.ID, "faults", stats.Faults, "prefetched", stats.Prefetched)
	default:
		reason := "its memory could not be served from the snapshot (lazy restore): " + err.Error()
		d.Log.Error("uffd handler failed: ending the VM, whose untouched pages would hang it", "sandbox", spec.ID, "error", err)
		if rerr := vmm.RecordExitReason(spec.RunDir, reason); rerr != nil {
			d.Log.Warn("cannot record why the VM ended", "sandbox", spec.ID, "error", rerr)
		}
		stopCtx, stop := context.WithTimeout(context.Background(), 30*time.Second)
		defer stop()
		if serr := d.Stop(stopCtx, spec, inst); serr != nil {
			d.Log.Error("cannot end the VM after its uffd handler failed", "sandbox", spec.ID, "error", serr)
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
