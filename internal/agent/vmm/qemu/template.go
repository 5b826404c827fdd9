package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/qemu/qmp"
)

// A memory template is two files: the guest's RAM as a plain file, which
// every clone maps privately (copy-on-write: the pages it does not write
// stay shared in the page cache), and the device state, migrated with
// x-ignore-shared so that it holds no RAM (tens of KB).
const (
	templateRAM   = "ram"
	templateState = "state.qemu"
)

var _ vmm.Cloner = (*Driver)(nil)

// CloneSupport implements vmm.Cloner: QEMU always can.
func (d *Driver) CloneSupport() error { return nil }

// unsafeForExec are characters that would break QEMU's option syntax
// (a memory-backend-file's mem-path) or a shell.
const unsafeForExec = "'\"\\ $`,"

// SaveMemory implements vmm.Cloner: migrate the stopped VM into
// dir/memory.qemu. QEMU keeps the source VM, so Thaw continues it.
func (d *Driver) SaveMemory(ctx context.Context, spec vmm.Spec, _ vmm.Instance, dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("memory snapshot: %w", err)
	}
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return err
	}
	defer c.Close()
	tmp := filepath.Join(dir, memoryFile+".tmp")
	if err := migrateTo(ctx, c, tmp, false); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("save memory: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, memoryFile)); err != nil {
		return fmt.Errorf("save memory: %w", err)
	}
	return nil
}

// migrateTo migrates a stopped VM into a file; ignoreShared leaves out the
// RAM kept in a shared file.
func migrateTo(ctx context.Context, c *qmp.Client, path string, ignoreShared bool) error {
	// Set either way: a clone keeps the capability from its own incoming
	// migration, and a pause must not inherit it.
	if err := setIgnoreShared(ctx, c, ignoreShared); err != nil {
		return err
	}
	if _, err := c.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": migrateBytesPS}); err != nil {
		return fmt.Errorf("set migration bandwidth: %w", err)
	}
	// QEMU 7.2 has no file: migration target: the agent opens the file and
	// passes it, so QEMU's seccomp filter can deny it any helper process.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("migration target: %w", err)
	}
	defer f.Close()
	if err := c.PassFile(ctx, migrationFD, f); err != nil {
		return fmt.Errorf("pass the migration target: %w", err)
	}
	if _, err := c.Execute(ctx, "migrate", map[string]any{"uri": "fd:" + migrationFD}); err != nil {
		return fmt.Errorf("start migration: %w", err)
	}
	if err := waitMigration(ctx, c); err != nil {
		return err
	}
	return f.Sync()
}

// migrationFD names the file passed for a migration.
const migrationFD = "wrenn-migration"

// migrateFrom starts the incoming migration of a QEMU started with
// "-incoming defer" from the file at path; waitLoaded waits for its end.
func migrateFrom(ctx context.Context, c *qmp.Client, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("migration source: %w", err)
	}
	defer f.Close() // QEMU holds its own copy
	if err := c.PassFile(ctx, migrationFD, f); err != nil {
		return fmt.Errorf("pass the migration source: %w", err)
	}
	if _, err := c.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + migrationFD}); err != nil {
		return fmt.Errorf("start the incoming migration: %w", err)
	}
	return nil
}

func setIgnoreShared(ctx context.Context, c *qmp.Client, on bool) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": on}}}
	if _, err := c.Execute(ctx, "migrate-set-capabilities", caps); err != nil {
		return fmt.Errorf("migration without shared memory: %w", err)
	}
	return nil
}

// MakeTemplate implements vmm.Cloner. A helper QEMU with its RAM in a
// shared file loads the saved state (which writes the guest's memory into
// the file), then migrates again without the RAM; it never runs the guest.
func (d *Driver) MakeTemplate(ctx context.Context, spec vmm.Spec, from, out string) error {
	mem := filepath.Join(from, memoryFile)
	if _, err := os.Stat(mem); err != nil {
		return fmt.Errorf("memory template: %w", err)
	}
	if strings.ContainsAny(mem+out, unsafeForExec) {
		return fmt.Errorf("memory template paths %q, %q have characters unsafe for QEMU", mem, out)
	}
	if err := os.MkdirAll(out, 0o750); err != nil {
		return fmt.Errorf("memory template: %w", err)
	}
	ram, state := filepath.Join(out, templateRAM+".tmp"), filepath.Join(out, templateState+".tmp")
	// The helper is the agent's own short-lived process, not a tenant's VM:
	// no cgroup of its own.
	// -S: loaded, the guest must not run, or its state would move past the
	// disk the template saved with it.
	inst, err := d.startWith(ctx, spec, ramFile{path: ram, shared: true}, nil, "-S", "-incoming", "defer")
	if err != nil {
		return fmt.Errorf("memory template: %w", err)
	}
	defer func() { _ = d.Stop(context.Background(), spec, inst) }()
	fail := func(err error) error {
		_ = os.Remove(ram)
		_ = os.Remove(state)
		return fmt.Errorf("memory template: %w; qemu: %s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 5))
	}
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	if err := migrateFrom(ctx, c, mem); err != nil {
		return fail(err)
	}
	if err := waitLoaded(ctx, c); err != nil {
		return fail(err)
	}
	if err := migrateTo(ctx, c, state, true); err != nil {
		return fail(err)
	}
	_, _ = c.Execute(ctx, "quit", nil)
	if err := vmm.WaitGone(ctx, inst.PID); err != nil {
		return fail(err)
	}
	// QEMU wrote the RAM through a shared mapping: on disk before the
	// template is called complete.
	if err := syncFile(ram); err != nil {
		return fail(err)
	}
	for _, f := range []string{templateRAM, templateState} {
		if err := os.Rename(filepath.Join(out, f+".tmp"), filepath.Join(out, f)); err != nil {
			return fail(err)
		}
	}
	d.Log.Info("memory template made", "dir", out, "memory_mib", spec.MemoryMiB)
	return nil
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Clone implements vmm.Cloner: QEMU maps the template's RAM privately and
// takes the device state from the file; the guest continues where the
// template VM stopped.
func (d *Driver) Clone(ctx context.Context, spec vmm.Spec, dir string) (vmm.Instance, error) {
	ram, state := filepath.Join(dir, templateRAM), filepath.Join(dir, templateState)
	for _, f := range []string{ram, state} {
		if _, err := os.Stat(f); err != nil {
			return vmm.Instance{}, fmt.Errorf("memory template: %w", err)
		}
	}
	if fi, _ := os.Stat(ram); fi.Size() != int64(spec.MemoryMiB)<<20 {
		return vmm.Instance{}, fmt.Errorf("memory template: %s holds %d bytes, not the %d MiB of guest memory it should", ram, fi.Size(), spec.MemoryMiB)
	}
	if strings.ContainsAny(ram+state, unsafeForExec) {
		return vmm.Instance{}, fmt.Errorf("memory template path %q has characters unsafe for QEMU", dir)
	}
	inst, err := d.startWith(ctx, spec, ramFile{path: ram}, d.Confine, "-incoming", "defer")
	if err != nil {
		return vmm.Instance{}, err
	}
	fail := func(err error) (vmm.Instance, error) {
		_ = d.Stop(context.Background(), spec, inst)
		return vmm.Instance{}, fmt.Errorf("start from memory template: %w; qemu: %s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 5))
	}
	c, err := qmp.Dial(ctx, qmpSocket(spec))
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	if err := setIgnoreShared(ctx, c, true); err != nil {
		return fail(err)
	}
	if err := migrateFrom(ctx, c, state); err != nil {
		return fail(err)
	}
	if err := waitLoaded(ctx, c); err != nil {
		return fail(err)
	}
	if _, err := c.Execute(ctx, "cont", nil); err != nil {
		return fail(fmt.Errorf("resume vCPUs: %w", err))
	}
	d.Log.Info("qemu started from a memory template", "sandbox", spec.ID, "pid", inst.PID, "template", dir)
	return inst, nil
}

// waitLoaded waits for an incoming migration to finish loading: the VM
// then stands stopped in the state it was saved in.
func waitLoaded(ctx context.Context, c *qmp.Client) error {
	// Loading from local disk takes seconds; the bound keeps a stuck load
	// from holding the sandbox for ever.
	loadCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		status, err := c.Status(loadCtx)
		if err != nil {
			return err
		}
		if mst, desc, _ := c.MigrationStatus(loadCtx); mst == "failed" {
			return fmt.Errorf("the saved state did not load: %s", desc)
		}
		switch status {
		case "inmigrate":
		case "running", "paused", "io-error", "postmigrate", "prelaunch":
			return nil
		default:
			return fmt.Errorf("the VM is %s after loading its state", status)
		}
		select {
		case <-loadCtx.Done():
			return errors.New("the saved state did not load in time")
		case <-time.After(5 * time.Millisecond):
		}
	}
}
