// Package qemu runs sandboxes with qemu-system-x86_64's microvm machine:
// KVM where usable, TCG otherwise, controlled over QMP. A snapshot is a
// migration of the paused VM into a file; a restore starts QEMU with the
// same machine and -incoming from that file, then continues it.
package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/qemu/qmp"
	"github.com/wrenn/wrenn/internal/kvm"
)

const (
	memoryFile     = "memory.qemu"
	migrateBytesPS = 8 << 30 // the default limit (32 MiB/s) makes saves slow
)

// Driver is the QEMU VMM driver.
type Driver struct {
	Binary string // default qemu-system-x86_64
	Log    *slog.Logger
	// Confine, when set, puts each QEMU under its VM's cgroup limits.
	Confine vmm.Confiner
	// Console says how much of each QEMU's output and guest console is kept.
	Console vmm.ConsoleLog
	kvm     bool
}

var _ vmm.Driver = (*Driver)(nil)

// New returns a driver, deciding once between KVM and TCG.
func New(log *slog.Logger) *Driver {
	return &Driver{Binary: "qemu-system-x86_64", Log: log, kvm: kvm.Usable()}
}

// Name implements vmm.Driver.
func (d *Driver) Name() string { return "qemu" }

// Accelerator reports "kvm" or "tcg".
func (d *Driver) Accelerator() string {
	if d.kvm {
		return "kvm"
	}
	return "tcg"
}

func qmpSocket(spec vmm.Spec) string { return filepath.Join(spec.RunDir, "qmp.sock") }

// kernelArgs are the guest kernel's command line.
func (d *Driver) kernelArgs(spec vmm.Spec) []string {
	kargs := []string{"console=ttyS0", "reboot=t", "panic=-1", "quiet",
		"root=/dev/vda", "rw", "rootfstype=ext4", "init=/usr/local/bin/wrenn-init"}
	if !d.kvm {
		kargs = append(kargs, kvm.TCGKernelArgs()...)
	}
	return append(kargs, spec.KernelArgs...)
}

// writeConfig puts the kernel command line in a QEMU config file in the
// run directory (the agent's alone): it holds envd's token, and QEMU's own
// command line is visible to every user of the host.
func (d *Driver) writeConfig(spec vmm.Spec) (string, error) {
	line := strings.Join(d.kernelArgs(spec), " ")
	if strings.ContainsAny(line, "\"\n\\") {
		return "", fmt.Errorf("kernel arguments with quotes, backslashes or newlines: %q", line)
	}
	if err := os.MkdirAll(spec.RunDir, 0o700); err != nil {
		return "", fmt.Errorf("qemu config: %w", err)
	}
	path := filepath.Join(spec.RunDir, "qemu.cfg")
	if err := os.WriteFile(path, []byte("[machine]\n  append = \""+line+"\"\n"), 0o600); err != nil {
		return "", fmt.Errorf("qemu config: %w", err)
	}
	return path, nil
}

// ramFile backs guest memory with a file (memory templates): shared, the
// VM's writes go to the file (the template VM); private, each clone maps
// the file copy-on-write. Empty: anonymous memory.
type ramFile struct {
	path   string
	shared bool
}

// args builds the QEMU command line. Boot and Restore use the same one, as
// migration requires; the kernel's command line comes from writeConfig.
func (d *Driver) args(spec vmm.Spec, ram ramFile) []string {
	// TCG's translation cache would otherwise grow to 1 GiB of the VMM's
	// memory, which its cgroup limit counts; 128 MiB is plenty for one guest.
	accel, cpu := "tcg,tb-size=128", "qemu64,+arat"
	if d.kvm {
		accel, cpu = "kvm", "host"
	}
	format := spec.DiskFormat
	if format == "" {
		format = "raw"
	}
	machine := "microvm,acpi=off"
	var memory []string
	if ram.path != "" {
		share := "off"
		if ram.shared {
			share = "on"
		}
		// The id of the RAM QEMU makes itself from -m: the migration
		// stream names RAM by it, so a clone can be paused and resumed with
		// anonymous memory, and a booted VM's state loads into a file.
		machine += ",memory-backend=microvm.ram"
		memory = []string{"-object", "memory-backend-file,id=microvm.ram,size=" + strconv.Itoa(spec.MemoryMiB) + "M,mem-path=" + ram.path + ",share=" + share}
	}
	args := []string{
		"-name", spec.ID,
		"-M", machine, "-accel", accel, "-cpu", cpu,
		"-m", strconv.Itoa(spec.MemoryMiB), "-smp", strconv.Itoa(spec.VCPUs),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-serial", "file:" + vmm.ConsolePath(spec.RunDir), // read by the agent into a capped log
		"-qmp", "unix:" + qmpSocket(spec) + ",server=on,wait=off",
		"-kernel", spec.Kernel,
		"-drive", "id=root,file=" + spec.Disk + ",format=" + format + ",if=none,cache=writeback,discard=unmap,werror=enospc,rerror=report",
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-rng-device",
		// seccomp: no obsolete system calls, no privilege changes, no
		// scheduler/resource tweaks, no new processes (snapshots travel
		// through files the agent passes over QMP).
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
	}
	args = append(args, memory...)
	switch {
	case spec.TapDevice != "":
		args = append(args,
			"-netdev", "tap,id=net0,ifname="+spec.TapDevice+",script=no,downscript=no",
			"-device", "virtio-net-device,netdev=net0,mac="+spec.MAC)
	case spec.MAC != "":
		// The same network card on no network: a VM that only moves its
		// state from one form to another (MakeTemplate) never runs.
		args = append(args,
			"-netdev", "hubport,id=net0,hubid=0",
			"-device", "virtio-net-device,netdev=net0,mac="+spec.MAC)
	}
	return args
}

// start launches QEMU with the sandbox's machine and any extra arguments.
func (d *Driver) start(ctx context.Context, spec vmm.Spec, extra ...string) (vmm.Instance, error) {
	return d.startWith(ctx, spec, ramFile{}, d.Confine, extra...)
}

func (d *Driver) startWith(ctx context.Context, spec vmm.Spec, ram ramFile, confine vmm.Confiner, extra ...string) (vmm.Instance, error) {
	cfg, err := d.writeConfig(spec)
	if err != nil {
		return vmm.Instance{}, err
	}
	argv := append([]string{d.Binary}, append(d.args(spec, ram), append([]string{"-readconfig", cfg}, extra...)...)...)
	return vmm.StartProcess(ctx, spec, argv, qmpSocket(spec), vmm.StartOptions{Confine: confine, Console: d.Console})
}

// Boot implements vmm.Driver.
func (d *Driver) Boot(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	inst, err := d.start(ctx, spec)
	if err != nil {
		return vmm.Instance{}, err
	}
	d.Log.Info("qemu started", "sandbox", spec.ID, "pid", inst.PID, "accel", d.Accelerator(), "vcpus", spec.VCPUs, "memory_mib", spec.MemoryMiB)
	return inst, nil
}

// Snapshot implements vmm.Driver: stop the vCPUs, migrate the VM into
// dir/memory.qemu, and quit QEMU.
func (d *Driver) Snapshot(ctx context.Context, spec vmm.Spec, inst vmm.Instance, dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("snapshot dir: %w", err)
	}
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Execute(ctx, "stop", nil); err != nil {
		return fmt.Errorf("pause vCPUs: %w", err)
	}
	// On failure the VM runs on: through a connection of its own (this
	// one may have been given up on), with any migration still going
	// cancelled first.
	resume := func() {
		rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = d.Thaw(rctx, spec, inst)
	}
	tmp := filepath.Join(dir, memoryFile+".tmp")
	if err := migrateTo(ctx, c, tmp, false); err != nil {
		resume()
		_ = os.Remove(tmp)
		return fmt.Errorf("save memory: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, memoryFile)); err != nil {
		resume()
		return fmt.Errorf("save memory: %w", err)
	}
	// The state is safe on disk; the VMM is no longer needed.
	_, _ = c.Execute(ctx, "quit", nil)
	return vmm.WaitGone(ctx, inst.PID)
}

func waitMigration(ctx context.Context, c *qmp.Client) error {
	status, desc, err := migrationUntil(ctx, c, func(status string) bool {
		return status == "completed" || status == "failed" || status == "cancelled"
	})
	if err == nil && status != "completed" {
		err = fmt.Errorf("migration %s: %s", status, desc)
	}
	return err
}

// migrationUntil polls the migration's status until done says it is one
// to stop at, and returns it.
func migrationUntil(ctx context.Context, c *qmp.Client, done func(status string) bool) (status, desc string, err error) {
	for {
		if status, desc, err = c.MigrationStatus(ctx); err != nil || done(status) {
			return status, desc, err
		}
		select {
		case <-ctx.Done():
			return status, desc, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Restore implements vmm.Driver.
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, dir string) (vmm.Instance, error) {
	mem := filepath.Join(dir, memoryFile)
	if _, err := os.Stat(mem); err != nil {
		return vmm.Instance{}, fmt.Errorf("restore: %w", err)
	}
	inst, err := d.start(ctx, spec, "-incoming", "defer")
	if err != nil {
		return vmm.Instance{}, err
	}
	fail := func(err error) (vmm.Instance, error) {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, fmt.Errorf("%w; qemu: %s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 5))
	}
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	if err := migrateFrom(ctx, c, mem); err != nil {
		return fail(fmt.Errorf("restore: %w", err))
	}
	// The incoming VM ends up stopped in the state it was saved in:
	// paused, or io-error if a full disk had stopped it (cont retries the
	// write).
	if err := waitLoaded(ctx, c); err != nil {
		return fail(fmt.Errorf("restore: %w", err))
	}
	if _, err := c.Execute(ctx, "cont", nil); err != nil {
		return fail(fmt.Errorf("resume vCPUs: %w", err))
	}
	d.Log.Info("qemu restored", "sandbox", spec.ID, "pid", inst.PID)
	return inst, nil
}

// Stop implements vmm.Driver.
func (d *Driver) Stop(ctx context.Context, spec vmm.Spec, inst vmm.Instance) error {
	return vmm.KillProcess(ctx, inst, qmpSocket(spec))
}

// Alive implements vmm.Driver: the pid must still be a QEMU for this
// sandbox (pids are reused).
func (d *Driver) Alive(spec vmm.Spec, inst vmm.Instance) bool {
	return vmm.ProcessAlive(inst, qmpSocket(spec))
}

// Freeze implements vmm.Driver. QMP stop drains and flushes every block
// device before it returns, so the disk file is consistent afterwards.
func (d *Driver) Freeze(ctx context.Context, spec vmm.Spec, _ vmm.Instance) error {
	return d.qmp(ctx, spec, "stop")
}

// Stalled implements vmm.Driver. QEMU's default for a failed disk write
// with ENOSPC (werror=enospc) is to stop the VM with status io-error and
// retry the write on cont.
func (d *Driver) Stalled(ctx context.Context, spec vmm.Spec, _ vmm.Instance) (bool, error) {
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return false, err
	}
	defer c.Close()
	status, err := c.Status(ctx)
	if err != nil {
		return false, err
	}
	return status == "io-error", nil
}

// Thaw implements vmm.Driver.
func (d *Driver) Thaw(ctx context.Context, spec vmm.Spec, _ vmm.Instance) error {
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return err
	}
	defer c.Close()
	// A save that failed or was given up on may still be migrating: a
	// VM cannot continue while it does.
	going := func(status string) bool {
		return status == "active" || status == "setup" || status == "device" || status == "cancelling"
	}
	if status, _, err := c.MigrationStatus(ctx); err == nil && going(status) && status != "cancelling" {
		if _, err := c.Execute(ctx, "migrate_cancel", nil); err != nil {
			return fmt.Errorf("qmp migrate_cancel: %w", err)
		}
		notGoing := func(status string) bool { return !going(status) }
		if _, _, err := migrationUntil(ctx, c, notGoing); err != nil {
			return err
		}
	}
	if _, err := c.Execute(ctx, "cont", nil); err != nil {
		return fmt.Errorf("qmp cont: %w", err)
	}
	return nil
}

func (d *Driver) qmp(ctx context.Context, spec vmm.Spec, command string) error {
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Execute(ctx, command, nil); err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	return nil
}
