package firecracker

import (
	"context"
	"os"
	"path/filepath"

	"github.com/wrenn/wrenn/internal/agent/vmm"
)

// A launcher starts and tracks a VM's Firecracker process one way:
// directly, or under the jailer. The driver chooses one when it is first
// used (see Driver.launcher) and every method goes through it, so each
// way can be read, and tested, on its own.
type launcher interface {
	// socket is the VM's API socket, as the host sees it.
	socket(spec vmm.Spec) string
	// prepare makes a fresh place for the VM's VMM, before anything is
	// handed to it (a new jail, with its own user).
	prepare(spec vmm.Spec) error
	// own hands the VMM a file that is the VM's alone (its disk, its
	// snapshot), to read and write; it answers the path the VMM uses.
	own(spec vmm.Spec, hostPath, vmPath string) (string, error)
	// share hands the VMM a file that many VMs read (the kernel, a memory
	// template), readable and never writable by it.
	share(spec vmm.Spec, hostPath, vmPath string) (string, error)
	// output is where the VMM writes the file named name that collect
	// then moves to hostPath.
	output(spec vmm.Spec, hostPath, name string) (string, error)
	collect(spec vmm.Spec, vmPath, hostPath string) error
	// uffdSocket is where the VM's page-fault handler listens, on the host
	// and as the VMM names it; grant lets the VMM's user connect to it.
	uffdSocket(spec vmm.Spec) (host, vm string)
	grant(spec vmm.Spec, hostPath string) error
	// ids are the uid and gid the VMM runs as.
	ids(spec vmm.Spec) (uid, gid int, err error)
	// start runs the VMM and returns once its API socket answers.
	start(ctx context.Context, spec vmm.Spec) (vmm.Instance, error)
	// alive says whether inst is still the VM's VMM; stop kills it and
	// removes what prepare made.
	alive(spec vmm.Spec, inst vmm.Instance) bool
	stop(ctx context.Context, spec vmm.Spec, inst vmm.Instance) error
}

// direct runs Firecracker as a child of the agent, in the sandbox's
// network namespace, with no capabilities and no_new_privs, under the
// VM's cgroup limits.
type direct struct {
	binary  string
	confine vmm.Confiner
	console vmm.ConsoleLog
}

func (l *direct) socket(spec vmm.Spec) string {
	return filepath.Join(spec.RunDir, "firecracker.sock")
}

func (l *direct) prepare(vmm.Spec) error { return nil }

func (l *direct) own(_ vmm.Spec, hostPath, _ string) (string, error) { return hostPath, nil }

func (l *direct) share(_ vmm.Spec, hostPath, _ string) (string, error) { return hostPath, nil }

func (l *direct) output(_ vmm.Spec, hostPath, _ string) (string, error) { return hostPath, nil }

func (l *direct) collect(_ vmm.Spec, vmPath, hostPath string) error {
	if vmPath == hostPath {
		return nil
	}
	return moveFile(vmPath, hostPath)
}

func (l *direct) uffdSocket(spec vmm.Spec) (string, string) {
	p := filepath.Join(spec.RunDir, "uffd.sock")
	return p, p
}

func (l *direct) grant(vmm.Spec, string) error { return nil }

func (l *direct) ids(vmm.Spec) (int, int, error) { return os.Geteuid(), os.Getegid(), nil }

func (l *direct) start(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	if err := os.MkdirAll(spec.RunDir, 0o750); err != nil {
		return vmm.Instance{}, err
	}
	argv := []string{l.binary, "--api-sock", l.socket(spec), "--id", spec.ID}
	// Always without privileges, --lazy-memory included: Firecracker makes
	// its userfaultfd through /dev/userfaultfd (Linux 6.1+), which its file
	// mode governs (see checkLazyMemory).
	return vmm.StartProcess(ctx, spec, argv, l.socket(spec), vmm.StartOptions{Confine: l.confine, Console: l.console})
}

func (l *direct) alive(spec vmm.Spec, inst vmm.Instance) bool {
	return vmm.ProcessAlive(inst, l.socket(spec))
}

func (l *direct) stop(ctx context.Context, spec vmm.Spec, inst vmm.Instance) error {
	return vmm.KillProcess(ctx, inst, l.socket(spec))
}
