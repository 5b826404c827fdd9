package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/wrenn/wrenn/internal/agent/vmm"
)

// A Firecracker memory template is a full snapshot: the guest memory file,
// which Firecracker maps privately (copy-on-write) on /snapshot/load, and
// the VM state. The state names the drive and TAP device by the paths the
// VM was configured with; under the jailer those are the same in every
// jail (/rootfs, tap0 in the sandbox's namespace), so clones find their
// own. A direct Firecracker names host paths unique to each sandbox, so
// only jailed Firecrackers make and start clones.

var _ vmm.Cloner = (*Driver)(nil)

// Where a clone's jail holds the template's files (read only).
const (
	jailedTemplateState  = "/template/" + stateFile
	jailedTemplateMemory = "/template/" + memoryFile
)

// errNeedsJailer is why a direct Firecracker cannot clone.
var errNeedsJailer = errors.New("firecracker: memory templates need --jailer (a direct Firecracker's snapshot names host paths unique to each sandbox)")

// CloneSupport implements vmm.Cloner.
func (d *Driver) CloneSupport() error {
	if _, ok := d.launcher().(*jailed); !ok {
		return errNeedsJailer
	}
	return nil
}

// SaveMemory implements vmm.Cloner: a full snapshot of the VM Freeze
// paused, which stays paused.
func (d *Driver) SaveMemory(ctx context.Context, spec vmm.Spec, _ vmm.Instance, dir string) error {
	if err := d.CloneSupport(); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("memory snapshot: %w", err)
	}
	l := d.launcher()
	state, memory := filepath.Join(dir, stateFile), filepath.Join(dir, memoryFile)
	req, err := d.snapshotTo(spec, state, memory)
	if err != nil {
		return err
	}
	if err := NewAPI(d.socket(spec)).CreateSnapshot(ctx, req, spec.MemoryMiB); err != nil {
		return fmt.Errorf("memory snapshot: %w", err)
	}
	return errors.Join(l.collect(spec, req.SnapshotPath, state), l.collect(spec, req.MemFilePath, memory))
}

// MakeTemplate implements vmm.Cloner: the snapshot is the template. Its
// files belong to the agent and nobody may write them; every clone's jail
// links them, readable (see jailed.share).
func (d *Driver) MakeTemplate(_ context.Context, spec vmm.Spec, from, out string) error {
	if err := d.CloneSupport(); err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o750); err != nil {
		return fmt.Errorf("memory template: %w", err)
	}
	for _, f := range []string{stateFile, memoryFile} {
		dst := filepath.Join(out, f)
		// A copy, not a link: the files under from may be a paused
		// sandbox's snapshot, which its resume hands to its own jail.
		if err := copyFile(filepath.Join(from, f), dst); err != nil {
			return fmt.Errorf("memory template: %w", err)
		}
		if err := os.Chmod(dst, 0o444); err != nil {
			return fmt.Errorf("memory template: %w", err)
		}
	}
	d.Log.Info("memory template made", "dir", out, "memory_mib", spec.MemoryMiB)
	return nil
}

// Clone implements vmm.Cloner: a fresh jailed Firecracker loads the
// template's state with its memory file and resumes.
func (d *Driver) Clone(ctx context.Context, spec vmm.Spec, dir string) (vmm.Instance, error) {
	if err := d.check(spec); err != nil {
		return vmm.Instance{}, err
	}
	if err := d.CloneSupport(); err != nil {
		return vmm.Instance{}, err
	}
	for _, f := range []string{stateFile, memoryFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return vmm.Instance{}, fmt.Errorf("memory template: %w", err)
		}
	}
	l := d.launcher()
	return d.prepared(l, spec, func() (vmm.Instance, error) { return d.clone(ctx, l, spec, dir) })
}

// clone is Clone after prepare.
func (d *Driver) clone(ctx context.Context, l launcher, spec vmm.Spec, dir string) (vmm.Instance, error) {
	if _, err := l.own(spec, spec.Disk, "/rootfs"); err != nil {
		return vmm.Instance{}, err
	}
	for inside, host := range map[string]string{jailedTemplateState: filepath.Join(dir, stateFile), jailedTemplateMemory: filepath.Join(dir, memoryFile)} {
		if _, err := l.share(spec, host, inside); err != nil {
			return vmm.Instance{}, err
		}
	}
	inst, api, err := d.start(ctx, spec)
	if err != nil {
		return vmm.Instance{}, err
	}
	load := SnapshotLoad{SnapshotPath: jailedTemplateState, MemBackend: &MemoryBackend{BackendType: "File", BackendPath: jailedTemplateMemory},
		ResumeVM: true, TrackDirtyPages: d.DiffSnapshots}
	if err := api.LoadSnapshot(ctx, load, spec.MemoryMiB); err != nil {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, fmt.Errorf("start from memory template: %w; firecracker: %s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 5))
	}
	d.Log.Info("firecracker started from a memory template", "sandbox", spec.ID, "pid", inst.PID, "template", dir)
	return inst, nil
}
