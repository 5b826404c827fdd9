// Package vmm is the boundary between the host agent and a virtual machine
// monitor. A driver boots a VM from a Spec, saves a running VM to a memory
// snapshot and stops it, restores one from a snapshot, and stops it for good.
// The Spec is stored with the sandbox: a restore must rebuild the identical
// machine, and an agent restarted after a crash re-adopts VMs from it.
package vmm

import (
	"context"
	"errors"
)

// ErrNotRunning means the VMM process is gone.
var ErrNotRunning = errors.New("vmm is not running")

// Spec describes one VM.
type Spec struct {
	ID         string   `json:"id"`
	Kernel     string   `json:"kernel"`
	Disk       string   `json:"disk"`        // the sandbox's own root disk
	DiskFormat string   `json:"disk_format"` // "qcow2" or "raw"
	VCPUs      int      `json:"vcpus"`
	MemoryMiB  int      `json:"memory_mib"`
	KernelArgs []string `json:"kernel_args"` // added to the driver's own (network, hostname, ...)
	TapDevice  string   `json:"tap_device"`  // inside NetNS
	MAC        string   `json:"mac"`
	NetNS      string   `json:"netns"`   // network namespace the VMM runs in
	RunDir     string   `json:"run_dir"` // sockets, console log, VMM log
}

// Confiner puts a VMM process under its VM's resource limits. StartProcess
// calls it while the process waits at a gate, before the VMM's program
// runs, so no guest memory is ever allocated outside the limits.
type Confiner interface {
	Confine(spec Spec, pid int) error
}

// Instance is a running VMM process.
type Instance struct {
	PID int `json:"pid"`
	// Start is when the process started, in clock ticks after boot: a pid
	// with its start time cannot name another process later (0: not
	// recorded, in records from before it was).
	Start uint64 `json:"start,omitempty"`
}

// Driver runs VMs with one VMM.
type Driver interface {
	// Name is "qemu" or "firecracker".
	Name() string
	// Boot starts a VM and returns once the VMM runs it (not once the guest is ready).
	Boot(ctx context.Context, spec Spec) (Instance, error)
	// Snapshot pauses the VM, writes its memory and device state under dir
	// and stops the VMM. On error the VM is left running when possible.
	Snapshot(ctx context.Context, spec Spec, inst Instance, dir string) error
	// Restore starts a VMM from a snapshot under dir and resumes the VM.
	Restore(ctx context.Context, spec Spec, dir string) (Instance, error)
	// Stop kills the VMM. Stopping one that is already gone is not an error.
	Stop(ctx context.Context, spec Spec, inst Instance) error
	// Alive reports whether inst is still this VM's VMM process.
	Alive(spec Spec, inst Instance) bool
	// Freeze stops the vCPUs with the disk flushed, so the disk can be
	// copied consistently; Thaw lets the VM run again.
	Freeze(ctx context.Context, spec Spec, inst Instance) error
	Thaw(ctx context.Context, spec Spec, inst Instance) error
	// Stalled reports whether the VMM stopped the VM because a write to
	// the host failed (a full disk); Thaw continues it once there is room.
	Stalled(ctx context.Context, spec Spec, inst Instance) (bool, error)
}

// Adopter is a driver with work of its own to take back for a running VM
// an earlier agent started (after an agent restart).
type Adopter interface {
	Adopt(spec Spec, inst Instance)
}

// Cloner is a driver that makes memory templates and starts VMs from them:
// a clone resumes the template VM's memory (shared, copy-on-write) with
// its own disk, network and process, instead of booting.
type Cloner interface {
	// CloneSupport says why this driver, as configured, cannot make or
	// start clones (nil when it can).
	CloneSupport() error
	// SaveMemory writes the memory and device state of a VM that Freeze
	// stopped into dir, in the format Snapshot writes; it stays stopped.
	SaveMemory(ctx context.Context, spec Spec, inst Instance, dir string) error
	// MakeTemplate turns the state under from (SaveMemory's or Snapshot's)
	// into a memory template under out. spec is the saved VM's machine
	// with a scratch disk of the same size, run directory and no network.
	MakeTemplate(ctx context.Context, spec Spec, from, out string) error
	// Clone starts a VM from the memory template under dir and resumes it.
	// spec has the template's vCPUs, memory and MAC, and its own disk
	// (a child of the template's), network and run directory.
	Clone(ctx context.Context, spec Spec, dir string) (Instance, error)
}
