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
	"sync"

	"github.com/wrenn/wrenn/internal/agent/vmm"
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
	// UFFDHandler, when set, is a program that serves a lazily restored
	// VM's page faults in a process of its own (the agent's binary, run as
	// "<program> uffd-handler ...": see HandlerMain), so that an agent
	// restart does not strand them; "" serves them in the agent.
	UFFDHandler string

	launchOnce sync.Once
	launch     launcher
}

// launcher is how this driver starts Firecracker, chosen at first use
// from its settings: under the jailer when Jailer is set, else directly.
func (d *Driver) launcher() launcher {
	d.launchOnce.Do(func() {
		if d.Jailer != nil {
			d.launch = newJailed(*d.Jailer, d.Binary, d.Console)
		} else {
			d.launch = &direct{binary: d.Binary, confine: d.Confine, console: d.Console}
		}
	})
	return d.launch
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

// socket is the VM's API socket on the host.
func (d *Driver) socket(spec vmm.Spec) string { return d.launcher().socket(spec) }

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

// start runs the VM's Firecracker and returns a client for its API.
func (d *Driver) start(ctx context.Context, spec vmm.Spec) (vmm.Instance, *API, error) {
	inst, err := d.launcher().start(ctx, spec)
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
	l := d.launcher()
	return d.prepared(l, spec, func() (vmm.Instance, error) { return d.boot(ctx, l, spec) })
}

// boot is Boot after prepare.
func (d *Driver) boot(ctx context.Context, l launcher, spec vmm.Spec) (vmm.Instance, error) {
	vmSpec := spec // what the VMM sees: jailed paths under the jailer
	var err error
	if vmSpec.Kernel, err = l.share(spec, spec.Kernel, "/vmlinux"); err != nil {
		return vmm.Instance{}, err
	}
	if vmSpec.Disk, err = l.own(spec, spec.Disk, "/rootfs"); err != nil {
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
	l := d.launcher()
	req, err := d.snapshotTo(spec, state, memory)
	if err != nil {
		return err
	}
	if diff {
		req.SnapshotType = "Diff"
	}
	if err := api.CreateSnapshot(ctx, req, spec.MemoryMiB); err != nil {
		_ = api.Resume(context.Background()) // leave it running, as it was
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := errors.Join(l.collect(spec, req.SnapshotPath, state), l.collect(spec, req.MemFilePath, memory)); err != nil {
		_ = api.Resume(context.Background())
		return fmt.Errorf("snapshot: %w", err)
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

// snapshotTo is a full snapshot request writing, through the launcher,
// what ends as the host's files state and memory.
func (d *Driver) snapshotTo(spec vmm.Spec, state, memory string) (SnapshotCreate, error) {
	l := d.launcher()
	req := SnapshotCreate{SnapshotType: "Full"}
	var err error
	if req.SnapshotPath, err = l.output(spec, state, stateFile); err != nil {
		return req, err
	}
	req.MemFilePath, err = l.output(spec, memory, memoryFile)
	return req, err
}

// prepared runs start after l.prepare(spec); if either fails, whatever
// prepare made and a failed start left (a jail, a VMM the jailer forked)
// goes.
func (d *Driver) prepared(l launcher, spec vmm.Spec, start func() (vmm.Instance, error)) (vmm.Instance, error) {
	if err := l.prepare(spec); err != nil {
		_ = l.stop(context.Background(), spec, vmm.Instance{})
		return vmm.Instance{}, err
	}
	inst, err := start()
	if err != nil {
		_ = l.stop(context.Background(), spec, vmm.Instance{})
		return vmm.Instance{}, err
	}
	return inst, nil
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
	return copyFrom(in, to)
}

// copyFrom copies what is left of in into to, replacing it.
func copyFrom(in *os.File, to string) error {
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
	l := d.launcher()
	return d.prepared(l, spec, func() (vmm.Instance, error) { return d.restore(ctx, l, spec, dir) })
}

// restore is Restore after prepare.
func (d *Driver) restore(ctx context.Context, l launcher, spec vmm.Spec, dir string) (vmm.Instance, error) {
	// The snapshot names the drive by the path the VM booted with.
	if _, err := l.own(spec, spec.Disk, "/rootfs"); err != nil {
		return vmm.Instance{}, err
	}
	statePath, err := l.own(spec, filepath.Join(dir, stateFile), "/snapshot/"+stateFile)
	if err != nil {
		return vmm.Instance{}, err
	}
	var backend *MemoryBackend
	var handler *uffdHandler
	if d.LazyMemory {
		if handler, err = d.listenUFFD(spec, filepath.Join(dir, memoryFile)); err != nil {
			return vmm.Instance{}, err
		}
		backend = &MemoryBackend{BackendType: "Uffd", BackendPath: handler.vmPath}
	} else {
		memPath, err := l.own(spec, filepath.Join(dir, memoryFile), "/snapshot/"+memoryFile)
		if err != nil {
			return vmm.Instance{}, err
		}
		backend = &MemoryBackend{BackendType: "File", BackendPath: memPath}
	}
	inst, api, err := d.start(ctx, spec)
	if err != nil {
		handler.abandon()
		return vmm.Instance{}, err
	}
	if handler != nil {
		// Serve the VM's page faults for as long as its VMM lives.
		go handler.serve(d, spec, inst)
	}
	if err := api.LoadSnapshot(ctx, SnapshotLoad{SnapshotPath: statePath, MemBackend: backend, ResumeVM: true, TrackDirtyPages: d.DiffSnapshots}, spec.MemoryMiB); err != nil {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, fmt.Errorf("restore: %w; firecracker: %s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 5))
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
	// The VMM first: its handler's watcher must see it gone, not a VM
	// whose handler died under it.
	err := d.launcher().stop(ctx, spec, inst)
	return errors.Join(err, stopHandler(ctx, spec))
}

// Alive implements vmm.Driver.
func (d *Driver) Alive(spec vmm.Spec, inst vmm.Instance) bool {
	return d.launcher().alive(spec, inst)
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
