// Package firecracker runs sandboxes with Firecracker on KVM hosts, through
// its HTTP API on a Unix socket: boot source, drive, network interface and
// machine configuration, then InstanceStart; pause with PATCH /vm, snapshot
// with /snapshot/create, restore with /snapshot/load from the memory file or
// lazily through a userfaultfd page-fault handler.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/firecracker/uffd"
)

// Files of a snapshot directory.
const (
	stateFile  = "vmstate.fc"
	memoryFile = "memory.fc"
)

// Driver is the Firecracker VMM driver.
type Driver struct {
	Binary string // default "firecracker"
	Log    *slog.Logger
	// LazyMemory restores through the UFFD handler: the VM runs as soon as
	// its state is loaded and pages arrive as it touches them.
	LazyMemory bool
	// DiffSnapshots tracks dirty pages so that pausing a sandbox that was
	// resumed before writes only the pages it changed since, merged into
	// the memory file kept from that resume. The merge relies on the file
	// system reporting holes (SEEK_DATA): ext4, xfs, btrfs and tmpfs do.
	DiffSnapshots bool
	// Jailer, when set, runs each VM under Firecracker's jailer.
	Jailer *Jailer
	// Confine, when set, puts each Firecracker not run by the jailer under
	// its VM's cgroup limits (the jailer makes the cgroup itself).
	Confine vmm.Confiner
	// Console says how much of each Firecracker's output (its guest's
	// serial console included) is kept.
	Console vmm.ConsoleLog
}

// baseMemory is where a restored sandbox's memory file is kept, as the
// base its next diff snapshot is merged into.
func baseMemory(spec vmm.Spec) string { return filepath.Join(spec.RunDir, "base-"+memoryFile) }

var _ vmm.Driver = (*Driver)(nil)

// New returns a driver for the firecracker binary on PATH (or at binary).
func New(log *slog.Logger, binary string, lazy bool) *Driver {
	if binary == "" {
		binary = "firecracker"
	}
	return &Driver{Binary: binary, Log: log, LazyMemory: lazy}
}

// Name implements vmm.Driver.
func (d *Driver) Name() string { return "firecracker" }

// socket is the API socket's path on the host.
func (d *Driver) socket(spec vmm.Spec) string {
	if j := d.jail(spec); j != nil {
		return j.host(jailedAPISocket)
	}
	return filepath.Join(spec.RunDir, "firecracker.sock")
}

// marker identifies this sandbox's VMM in /proc/<pid>/cmdline.
func (d *Driver) marker(spec vmm.Spec) string {
	if d.jail(spec) != nil {
		return "--id=" + spec.ID // the jailer execs firecracker with it
	}
	return d.socket(spec)
}

// inside maps a host path to the one the VMM sees: itself, or its place in
// the jail after staging it there.
func (d *Driver) inside(spec vmm.Spec, hostPath, jailPath string) (string, error) {
	j := d.jail(spec)
	if j == nil {
		return hostPath, nil
	}
	return jailPath, j.stage(hostPath, jailPath)
}

// Firecracker's --id allows letters, digits and hyphens, up to 64.
var validID = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)

// BootArgs are the kernel arguments for a Firecracker guest.
func BootArgs(spec vmm.Spec) string {
	args := []string{"console=ttyS0", "reboot=k", "panic=1", "pci=off", "quiet",
		"root=/dev/vda", "rw", "rootfstype=ext4", "init=/usr/local/bin/wrenn-init"}
	return strings.Join(append(args, spec.KernelArgs...), " ")
}

func (d *Driver) check(spec vmm.Spec) error {
	if !validID.MatchString(spec.ID) {
		return fmt.Errorf("firecracker: sandbox id %q must be 1-64 letters, digits or hyphens", spec.ID)
	}
	if spec.DiskFormat != "" && spec.DiskFormat != "raw" {
		return fmt.Errorf("firecracker: disk format %q is not supported (raw images only: use the copy or device-mapper disk driver)", spec.DiskFormat)
	}
	// The spec bounds vcpu_count to 1..32 (an even count only matters with SMT, which stays off).
	if spec.VCPUs < 1 || spec.VCPUs > 32 {
		return fmt.Errorf("firecracker: vcpus %d outside 1..32", spec.VCPUs)
	}
	return nil
}

func (d *Driver) start(ctx context.Context, spec vmm.Spec) (vmm.Instance, *API, error) {
	argv := []string{d.Binary, "--api-sock", d.socket(spec), "--id", spec.ID}
	// A lazy restore needs Firecracker to create a userfaultfd, which the
	// kernel allows a process without CAP_SYS_PTRACE only with
	// vm.unprivileged_userfaultfd=1: such a Firecracker keeps the agent's
	// capabilities (the jailer drops them in its own way).
	opts := vmm.StartOptions{Confine: d.Confine, KeepPrivileges: d.LazyMemory, Console: d.Console}
	if j := d.jail(spec); j != nil {
		opts = vmm.StartOptions{KeepPrivileges: true, Console: d.Console}
		argv = j.argv(spec)
		if err := os.MkdirAll(j.host("/run"), 0o750); err != nil {
			return vmm.Instance{}, nil, err
		}
		_ = os.Chown(j.host("/run"), j.cfg.UID, j.cfg.GID)
		spec.NetNS = "" // the jailer joins the namespace itself
	}
	inst, err := vmm.StartProcess(ctx, spec, argv, d.socket(spec), opts)
	if err != nil {
		return vmm.Instance{}, nil, err
	}
	return inst, NewAPI(d.socket(spec)), nil
}

// Configure sends the pre-boot configuration of spec, in the order
// Firecracker requires (all of it before InstanceStart).
func Configure(ctx context.Context, api *API, spec vmm.Spec, trackDirty bool) error {
	steps := []struct {
		what string
		call func() error
	}{
		{"machine config", func() error {
			mc := MachineConfig{VCPUCount: spec.VCPUs, MemSizeMiB: spec.MemoryMiB}
			if trackDirty {
				mc.TrackDirtyPages = &trackDirty
			}
			return api.PutMachineConfig(ctx, mc)
		}},
		{"boot source", func() error {
			return api.PutBootSource(ctx, BootSource{KernelImagePath: spec.Kernel, BootArgs: BootArgs(spec)})
		}},
		{"root drive", func() error {
			rw := false
			return api.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: spec.Disk, IsRootDevice: true, IsReadOnly: &rw, CacheType: "Writeback"})
		}},
		{"entropy device", func() error { return api.PutEntropy(ctx) }},
	}
	if spec.TapDevice != "" {
		steps = append(steps, struct {
			what string
			call func() error
		}{"network interface", func() error {
			return api.PutNetworkInterface(ctx, NetworkInterface{IfaceID: "eth0", HostDevName: spec.TapDevice, GuestMAC: spec.MAC})
		}})
	}
	for _, s := range steps {
		if err := s.call(); err != nil {
			return fmt.Errorf("configure %s: %w", s.what, err)
		}
	}
	return nil
}

// Boot implements vmm.Driver.
func (d *Driver) Boot(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	if err := d.check(spec); err != nil {
		return vmm.Instance{}, err
	}
	vmSpec := spec // what the VMM sees: jailed paths under the jailer
	var err error
	if vmSpec.Kernel, err = d.inside(spec, spec.Kernel, "/vmlinux"); err != nil {
		return vmm.Instance{}, err
	}
	if vmSpec.Disk, err = d.inside(spec, spec.Disk, "/rootfs"); err != nil {
		return vmm.Instance{}, err
	}
	inst, api, err := d.start(ctx, spec)
	if err != nil {
		return vmm.Instance{}, err
	}
	if err := Configure(ctx, api, vmSpec, d.DiffSnapshots); err != nil {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, err
	}
	if err := api.Start(ctx); err != nil {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, fmt.Errorf("start instance: %w", err)
	}
	d.Log.Info("firecracker started", "sandbox", spec.ID, "pid", inst.PID, "vcpus", spec.VCPUs, "memory_mib", spec.MemoryMiB)
	return inst, nil
}

// Snapshot implements vmm.Driver: pause, write a snapshot, stop. With
// DiffSnapshots and a base kept from the last restore, only the dirtied
// pages are written and then merged into that base.
func (d *Driver) Snapshot(ctx context.Context, spec vmm.Spec, inst vmm.Instance, dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("snapshot dir: %w", err)
	}
	api := NewAPI(d.socket(spec))
	if err := api.Pause(ctx); err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	_, baseErr := os.Stat(baseMemory(spec))
	diff := d.DiffSnapshots && baseErr == nil
	state, memory := filepath.Join(dir, stateFile+".tmp"), filepath.Join(dir, memoryFile+".tmp")
	req := SnapshotCreate{SnapshotPath: state, MemFilePath: memory, SnapshotType: "Full"}
	j := d.jail(spec)
	if j != nil {
		// The jailed Firecracker writes inside its jail; the files move out below.
		req.SnapshotPath, req.MemFilePath = "/snapshot/"+stateFile, "/snapshot/"+memoryFile
		if err := os.MkdirAll(j.host("/snapshot"), 0o750); err != nil {
			return err
		}
		_ = os.Chown(j.host("/snapshot"), j.cfg.UID, j.cfg.GID)
	}
	if diff {
		req.SnapshotType = "Diff"
	}
	if err := api.CreateSnapshot(ctx, req); err != nil {
		_ = api.Resume(context.Background()) // leave it running, as it was
		return fmt.Errorf("snapshot: %w", err)
	}
	if j != nil {
		if err := errors.Join(j.unstage(req.SnapshotPath, state), j.unstage(req.MemFilePath, memory)); err != nil {
			_ = api.Resume(context.Background())
			return fmt.Errorf("snapshot: %w", err)
		}
	}
	// The state is on disk; the VMM must be gone before its memory file changes.
	if err := d.Stop(ctx, spec, inst); err != nil {
		return err
	}
	if diff {
		if err := mergeDiff(baseMemory(spec), memory); err != nil {
			return err
		}
		if err := moveFile(baseMemory(spec), memory); err != nil {
			return fmt.Errorf("snapshot: %w", err)
		}
	}
	return errors.Join(os.Rename(memory, filepath.Join(dir, memoryFile)),
		os.Rename(state, filepath.Join(dir, stateFile)))
}

// moveFile renames, or copies when from and to are on different file systems.
func moveFile(from, to string) error {
	if err := os.Rename(from, to); err == nil {
		return nil
	}
	if err := copyFile(from, to); err != nil {
		return err
	}
	return os.Remove(from)
}

// linkOrCopy makes to a copy of from, by hard link where it can.
func linkOrCopy(from, to string) error {
	_ = os.Remove(to)
	if err := os.Link(from, to); err == nil {
		return nil
	}
	return copyFile(from, to)
}

// copyFile copies a file's content into to, replacing it.
func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// Restore implements vmm.Driver.
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, dir string) (vmm.Instance, error) {
	if err := d.check(spec); err != nil {
		return vmm.Instance{}, err
	}
	for _, f := range []string{stateFile, memoryFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return vmm.Instance{}, fmt.Errorf("restore: %w", err)
		}
	}
	// The snapshot names the drive by the path the VM booted with.
	if _, err := d.inside(spec, spec.Disk, "/rootfs"); err != nil {
		return vmm.Instance{}, err
	}
	statePath, err := d.inside(spec, filepath.Join(dir, stateFile), "/snapshot/"+stateFile)
	if err != nil {
		return vmm.Instance{}, err
	}
	memPath, err := d.inside(spec, filepath.Join(dir, memoryFile), "/snapshot/"+memoryFile)
	if err != nil {
		return vmm.Instance{}, err
	}
	backend := &MemoryBackend{BackendType: "File", BackendPath: memPath}
	if d.LazyMemory {
		socket, seen := filepath.Join(spec.RunDir, "uffd.sock"), filepath.Join(spec.RunDir, "uffd.sock")
		if j := d.jail(spec); j != nil {
			socket, seen = j.host("/uffd.sock"), "/uffd.sock"
		}
		if err := os.MkdirAll(filepath.Dir(socket), 0o750); err != nil {
			return vmm.Instance{}, err
		}
		ln, err := uffd.Listen(socket)
		if err != nil {
			return vmm.Instance{}, err
		}
		if j := d.jail(spec); j != nil {
			_ = os.Chown(socket, j.cfg.UID, j.cfg.GID) // the jailed user connects to it
		}
		// The handler outlives this call: it serves faults until every page
		// is in, then exits (see package uffd).
		go func() {
			serveCtx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			stats, err := uffd.Serve(serveCtx, ln, filepath.Join(dir, memoryFile), true)
			if err != nil {
				d.Log.Error("uffd handler failed", "sandbox", spec.ID, "error", err)
				return
			}
			d.Log.Info("uffd handler done", "sandbox", spec.ID, "faults", stats.Faults, "prefetched", stats.Prefetched)
		}()
		backend = &MemoryBackend{BackendType: "Uffd", BackendPath: seen}
	}
	inst, api, err := d.start(ctx, spec)
	if err != nil {
		return vmm.Instance{}, err
	}
	if err := api.LoadSnapshot(ctx, SnapshotLoad{SnapshotPath: statePath, MemBackend: backend, ResumeVM: true, TrackDirtyPages: d.DiffSnapshots}); err != nil {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, fmt.Errorf("restore: %w", err)
	}
	if d.DiffSnapshots {
		// Keep this memory as the base of the next (diff) snapshot; the
		// caller may delete the snapshot directory now.
		if err := linkOrCopy(filepath.Join(dir, memoryFile), baseMemory(spec)); err != nil {
			d.Log.Warn("cannot keep the memory file for diff snapshots; the next pause writes a full one", "sandbox", spec.ID, "error", err)
		}
	}
	d.Log.Info("firecracker restored", "sandbox", spec.ID, "pid", inst.PID, "memory", backend.BackendType)
	return inst, nil
}

// Stop implements vmm.Driver; a jail is removed with its VMM.
func (d *Driver) Stop(ctx context.Context, spec vmm.Spec, inst vmm.Instance) error {
	if err := vmm.KillProcess(ctx, inst.PID, d.marker(spec)); err != nil {
		return err
	}
	if j := d.jail(spec); j != nil {
		return j.remove()
	}
	return nil
}

// Alive implements vmm.Driver.
func (d *Driver) Alive(spec vmm.Spec, inst vmm.Instance) bool {
	return vmm.ProcessAlive(inst.PID, d.marker(spec))
}

// Freeze implements vmm.Driver.
func (d *Driver) Freeze(ctx context.Context, spec vmm.Spec, _ vmm.Instance) error {
	return NewAPI(d.socket(spec)).Pause(ctx)
}

// Thaw implements vmm.Driver.
func (d *Driver) Thaw(ctx context.Context, spec vmm.Spec, _ vmm.Instance) error {
	return NewAPI(d.socket(spec)).Resume(ctx)
}

// Stalled implements vmm.Driver. Firecracker never stops a VM on a failed
// host write: the guest gets the I/O error instead.
func (d *Driver) Stalled(context.Context, vmm.Spec, vmm.Instance) (bool, error) {
	return false, nil
}
