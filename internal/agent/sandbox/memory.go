package sandbox

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/guest/template"
	"github.com/wrenn/wrenn/internal/safetext"
)

// Memory templates: a template can hold a running VM's memory next to its
// disk. A sandbox that fits it (same VMM, kernel, vCPUs, memory and disk
// size) starts by restoring that memory, copy-on-write, instead of booting;
// the guest then continues where the template VM stopped, with every
// process it ran. /init makes each one itself: its own envd token,
// environment, host name, clock and fresh kernel randomness.

// Where a sandbox's VM came from (Record.StartedFrom).
const (
	StartedBoot   = "boot"
	StartedMemory = "memory"
)

// templateTokenFile holds the envd token the template VM had: a clone's
// envd answers to it until its first /init.
const templateTokenFile = "envd-token"

// cloneEntropy is how much host randomness each clone's kernel gets.
const cloneEntropy = 64

// cloner is the driver's side of memory templates, or why there is none.
func (m *Manager) cloner() (vmm.Cloner, error) {
	c, ok := m.cfg.Driver.(vmm.Cloner)
	if !ok {
		return nil, fmt.Errorf("%s cannot make memory templates", m.cfg.Driver.Name())
	}
	if err := c.CloneSupport(); err != nil {
		return nil, err
	}
	return c, nil
}

// fromMemory says whether a new sandbox can start from its template's
// memory, and if not, why (empty when the template has none).
func (m *Manager) fromMemory(tpl template.Metadata, rec *Record, kernelPath string) (bool, string) {
	mem := tpl.Memory
	if mem == nil {
		return false, ""
	}
	if mem.VMM != m.cfg.Driver.Name() {
		return false, fmt.Sprintf("booted: template %s's memory was saved with %s, this host runs %s", tpl.Name, mem.VMM, m.cfg.Driver.Name())
	}
	if _, err := m.cloner(); err != nil {
		return false, fmt.Sprintf("booted: %v", err)
	}
	if mem.Kernel != filepath.Base(kernelPath) {
		return false, fmt.Sprintf("booted: template %s's memory was saved with kernel %s, this host boots %s", tpl.Name, mem.Kernel, filepath.Base(kernelPath))
	}
	if mem.VCPUs != rec.VCPUs || mem.MemoryMiB != rec.MemoryMiB || mem.DiskMiB != rec.DiskMiB {
		return false, fmt.Sprintf("booted: template %s's memory is for %d vCPU, %d MiB of memory and %d MiB of disk; this sandbox has %d, %d and %d",
			tpl.Name, mem.VCPUs, mem.MemoryMiB, mem.DiskMiB, rec.VCPUs, rec.MemoryMiB, rec.DiskMiB)
	}
	return true, ""
}

// templateToken reads the envd token a template VM had.
func (m *Manager) templateToken(name string) (string, error) {
	data, err := os.ReadFile(filepath.Join(m.templates.MemoryDir(name), templateTokenFile))
	if err != nil {
		return "", fmt.Errorf("template %s's memory snapshot is incomplete: %w", name, err)
	}
	return strings.TrimSpace(string(data)), nil
}

// memoryDisk is the disk a memory template saved with its memory when the
// template's own image is not that disk (a shipped image, warmed).
const memoryDisk = "disk.raw"

// cloneBacking is the disk a sandbox started from tpl's memory is a child of.
func (m *Manager) cloneBacking(tpl template.Metadata) string {
	if tpl.Memory != nil && tpl.Memory.Disk != "" {
		return filepath.Join(m.templates.MemoryDir(tpl.Name), tpl.Memory.Disk)
	}
	return m.templates.RootfsPath(tpl.Name)
}

// cloneDisk makes a sandbox disk in dest on backing, a file of template
// tpl: on a layer (a fork's image) with the disk driver's layers.
func (m *Manager) cloneDisk(ctx context.Context, tpl template.Metadata, backing, dest string, sizeBytes int64) (disk.Disk, error) {
	if !tpl.Layer || backing != m.templates.RootfsPath(tpl.Name) {
		return m.cfg.Disks.Clone(ctx, backing, dest, sizeBytes)
	}
	l, ok := m.cfg.Disks.(disk.Layers)
	if !ok {
		return disk.Disk{}, fmt.Errorf("template %s is a disk layer, which the %s disk driver cannot stack on", tpl.Name, m.cfg.Disks.Name())
	}
	return l.CloneLayer(ctx, backing, dest, sizeBytes)
}

// saveMemoryTemplate turns a VM's saved state (memory.qemu under from) into
// template name's memory snapshot. rec is the sandbox it was taken from.
// Its disk at that moment is the template's image, or ownDisk, a flattened
// copy that moves into the memory snapshot.
func (m *Manager) saveMemoryTemplate(ctx context.Context, name string, rec Record, from, ownDisk string) (*template.Memory, error) {
	cloner, err := m.cloner()
	if err != nil {
		return nil, err
	}
	if err := m.needSpace("the memory of template "+name, rec.MemoryMiB); err != nil {
		return nil, err
	}
	start := time.Now()
	// A scratch disk like the sandbox's: the device set must match.
	work, err := os.MkdirTemp(m.sandboxDir(rec), "template-")
	if err != nil {
		return nil, fmt.Errorf("memory template: %w", err)
	}
	defer os.RemoveAll(work)
	out := m.templates.MemoryDir(name)
	if err := os.RemoveAll(out); err != nil {
		return nil, fmt.Errorf("memory template: %w", err)
	}
	fail := func(err error) (*template.Memory, error) {
		_ = os.RemoveAll(out)
		return nil, noSpace(err)
	}
	// A fork's memory is in RAM when the fork made a place for it there.
	if ram := m.forkMemoryDir(name); ram != "" {
		if fi, err := os.Lstat(ram); err == nil && fi.IsDir() {
			if err := os.Symlink(ram, out); err != nil {
				return fail(fmt.Errorf("memory template: %w", err))
			}
		}
	}
	backing, diskName := m.templates.RootfsPath(name), ""
	if ownDisk != "" {
		if err := os.MkdirAll(out, 0o750); err != nil {
			return fail(fmt.Errorf("memory template: %w", err))
		}
		backing, diskName = filepath.Join(out, memoryDisk), memoryDisk
		if err := os.Rename(ownDisk, backing); err != nil {
			return fail(fmt.Errorf("memory template: %w", err))
		}
	}
	tpl, err := m.templates.Get(name)
	if err != nil {
		return fail(fmt.Errorf("memory template: %w", err))
	}
	scratchDisk := filepath.Join(work, "rootfs."+m.cfg.Disks.Name())
	dsk, err := m.cloneDisk(ctx, tpl, backing, scratchDisk, int64(rec.DiskMiB)<<20)
	if err != nil {
		return fail(fmt.Errorf("memory template: %w", err))
	}
	defer func() { _ = m.cfg.Disks.Release(context.Background(), scratchDisk) }()
	// And a network card like its own (a TAP: the saved card expects
	// one's header format), in its namespace, on no network.
	if !m.cfg.Net.Exists(rec.Net) {
		if err := m.cfg.Net.Setup(ctx, rec.Net, rec.Egress); err != nil {
			return fail(fmt.Errorf("memory template: %w", err))
		}
	}
	removeTap, err := m.cfg.Net.ScratchTap(ctx, rec.Net, "tpl0")
	if err != nil {
		return fail(fmt.Errorf("memory template: %w", err))
	}
	defer removeTap()
	spec := rec.Spec
	spec.ID = "template-" + name
	spec.Disk, spec.DiskFormat = dsk.Path, dsk.Format
	spec.TapDevice = "tpl0"
	// Its control socket's path must stay under the 108 bytes of a Unix
	// socket address, whatever WRENN_DIR is: a short private directory.
	runDir, err := os.MkdirTemp("", "wrenn-tpl-")
	if err != nil {
		return fail(fmt.Errorf("memory template: %w", err))
	}
	defer os.RemoveAll(runDir)
	spec.RunDir = runDir
	if err := cloner.MakeTemplate(ctx, spec, from, out); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(filepath.Join(out, templateTokenFile), []byte(rec.EnvdToken+"\n"), 0o600); err != nil {
		return fail(fmt.Errorf("memory template: %w", err))
	}
	size, err := dirSize(out)
	if err != nil {
		return fail(err)
	}
	mem := &template.Memory{
		VMM: m.cfg.Driver.Name(), VCPUs: rec.VCPUs, MemoryMiB: rec.MemoryMiB, DiskMiB: rec.DiskMiB,
		Kernel: filepath.Base(rec.Spec.Kernel), MAC: rec.Spec.MAC, SizeBytes: size, Created: time.Now().UTC(), Disk: diskName,
	}
	if err := m.templates.SetMemory(name, mem); err != nil {
		return fail(err)
	}
	m.log.Info("template memory saved", "template", name, "sandbox", rec.ID, "memory_mib", rec.MemoryMiB, "bytes", size, "took", time.Since(start).Round(time.Millisecond))
	return mem, nil
}

// dirSize is the size of a memory snapshot's files (its disk aside).
func dirSize(dir string) (int64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, e := range entries {
		if e.Name() == memoryDisk {
			continue // counted as the template's disk
		}
		fi, err := e.Info()
		if err != nil {
			return 0, err
		}
		total += fi.Size()
	}
	return total, nil
}

// newEntropy is a clone's fresh kernel seed.
func newEntropy() ([]byte, error) {
	b := make([]byte, cloneEntropy)
	_, err := rand.Read(b)
	return b, err
}

// copyFrozen copies a running sandbox at one moment: with its guest
// flushed and its vCPUs stopped, copyDisk copies its disk and, when memDir
// is set, its memory is saved there; then it runs on, whatever happened.
func (m *Manager) copyFrozen(ctx context.Context, e *entry, copyDisk func(context.Context) error, memDir string) error {
	rec := e.rec
	var cloner vmm.Cloner
	if memDir != "" {
		var err error
		if cloner, err = m.cloner(); err != nil {
			return err
		}
	}
	prepCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := m.client(e).PrepareSnapshot(prepCtx); err != nil {
		m.log.Warn("guest did not flush before the copy", "sandbox", rec.ID, "error", err)
	}
	cancel()
	if err := m.cfg.Driver.Freeze(ctx, rec.Spec, rec.VMM); err != nil {
		return fmt.Errorf("freeze %s: %w", rec.ID, err)
	}
	defer func() {
		if err := m.cfg.Driver.Thaw(context.Background(), rec.Spec, rec.VMM); err != nil {
			m.log.Error("could not continue the sandbox after the copy", "sandbox", rec.ID, "error", err)
		}
	}()
	if err := copyDisk(ctx); err != nil {
		return err
	}
	if cloner == nil {
		return nil
	}
	return cloner.SaveMemory(ctx, rec.Spec, rec.VMM, memDir)
}

// flattenTo is copyFrozen's disk copy into a standalone image.
func flattenTo(rec Record, dest string) func(context.Context) error {
	return func(ctx context.Context) error {
		return template.Flatten(ctx, rec.Spec.Disk, rec.Spec.DiskFormat, dest)
	}
}

// Shape is the machine a memory template is prepared for.
type Shape struct {
	VCPUs, MemoryMiB, DiskMiB int
}

// PrepareMemory gives template name a memory snapshot of the given shape
// when it has none: it boots a sandbox of it (with no network access),
// waits for envd, saves its memory with its disk as it is then, and
// destroys it. Sandboxes of that shape then start from the memory. It is
// how the shipped images (minimal, base) are made fast on every host.
func (m *Manager) PrepareMemory(ctx context.Context, name string, shape Shape) error {
	tpl, err := m.templates.Get(name)
	if err != nil {
		return err
	}
	if tpl.Memory != nil {
		return nil
	}
	if _, err := m.cloner(); err != nil {
		return fmt.Errorf("template %s: %w", name, err)
	}
	start := time.Now()
	id := "tplvm-" + strings.ReplaceAll(name, ".", "-")
	id = strings.ReplaceAll(id, "_", "-")
	_ = m.Destroy(ctx, id) // one a crash left behind
	rec, err := m.Create(ctx, CreateParams{ID: id, Template: name, VCPUs: shape.VCPUs, MemoryMiB: shape.MemoryMiB,
		DiskMiB: shape.DiskMiB, Timeout: 10 * time.Minute, Egress: egress.Policy{Mode: egress.DenyAll}, internal: true})
	if err != nil {
		return fmt.Errorf("template %s: boot a VM to save its memory: %w", name, err)
	}
	defer func() {
		if err := m.Destroy(context.WithoutCancel(ctx), id); err != nil {
			m.log.Warn("could not destroy the VM a memory template was made from", "sandbox", id, "error", err)
		}
	}()
	if err := m.waitImageReady(ctx, id); err != nil {
		return fmt.Errorf("template %s: %w", name, err)
	}
	e, err := m.lock(ctx, id)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	if err := m.needSpace("the memory of template "+name, rec.MemoryMiB); err != nil {
		return err
	}
	disk := filepath.Join(m.sandboxDir(e.rec), "memory-disk.raw")
	memDir := filepath.Join(m.sandboxDir(e.rec), "template-memory")
	if err := m.copyFrozen(ctx, e, flattenTo(e.rec, disk), memDir); err != nil {
		return fmt.Errorf("template %s: %w", name, noSpace(err))
	}
	if _, err := m.saveMemoryTemplate(ctx, name, e.rec, memDir, disk); err != nil {
		return fmt.Errorf("template %s: %w", name, err)
	}
	m.log.Info("template prepared to start from memory", "template", name, "vcpus", shape.VCPUs, "memory_mib", shape.MemoryMiB, "disk_mib", shape.DiskMiB, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// imageReady is an image's ready check: the memory of an image whose
// services its init starts (/etc/wrenn/start) is saved once it exits 0.
const imageReady = "/etc/wrenn/ready"

// imageReadyTimeout bounds the wait for an image's services.
const imageReadyTimeout = 5 * time.Minute

// waitImageReady runs the image's ready check in sandbox id until it
// passes; an image without one is ready at once.
func (m *Manager) waitImageReady(ctx context.Context, id string) error {
	c, err := m.Envd(id)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, imageReadyTimeout)
	defer cancel()
	check := "if [ -e " + imageReady + " ]; then exec " + imageReady + "; fi"
	for start := time.Now(); ; {
		var code *int32
		var said []byte
		err := c.Exec(ctx, rootCommand("/bin/sh", "-c", check), func(ev envdclient.ExecEvent) error {
			if ev.ExitCode != nil {
				code = ev.ExitCode
			}
			if len(said) < 4096 {
				said = append(said, ev.Stderr...)
			}
			return nil
		})
		if err == nil && code != nil && *code == 0 {
			if time.Since(start) > time.Second {
				m.log.Info("the image's services are ready", "sandbox", id, "took", time.Since(start).Round(time.Millisecond))
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("its ready check (%s) did not pass within %v: %v %s", imageReady, imageReadyTimeout, err, safetext.Clip(string(said), 512))
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// rootCommand is a command run as root.
func rootCommand(cmd string, args ...string) envdclient.ExecSpec {
	return envdclient.ExecSpec{Cmd: cmd, Args: args, User: "root", KillOnCancel: true}
}

// MemoryTemplate is one template PrepareMemory readies, with its shape.
type MemoryTemplate struct {
	Name string
	Shape
}

// ParseMemoryTemplates reads "name:vcpus:memory_mib:disk_mib,..." (the
// agent's --memory-templates); "" is none.
func ParseMemoryTemplates(s string) ([]MemoryTemplate, error) {
	items, err := parseSpecList(s, "name:vcpus:memory_mib:disk_mib", 3)
	if err != nil {
		return nil, fmt.Errorf("memory template %w", err)
	}
	var out []MemoryTemplate
	for _, it := range items {
		vcpus, mem, disk := it.nums[0], it.nums[1], it.nums[2]
		if vcpus < 1 || vcpus > MaxVCPUs || mem < MinMemoryMiB || disk < 1 || disk > MaxDiskMiB {
			return nil, fmt.Errorf("memory template %q: 1 to %d vCPUs, at least %d MiB of memory, 1 to %d MiB of disk", it.raw, MaxVCPUs, MinMemoryMiB, MaxDiskMiB)
		}
		out = append(out, MemoryTemplate{Name: it.name, Shape: Shape{VCPUs: vcpus, MemoryMiB: mem, DiskMiB: disk}})
	}
	return out, nil
}

// PrepareMemoryTemplates runs PrepareMemory for each, one after another
// (in the background at agent start: creates meanwhile boot as before).
func (m *Manager) PrepareMemoryTemplates(ctx context.Context, list []MemoryTemplate) {
	for _, t := range list {
		if err := m.PrepareMemory(ctx, t.Name, t.Shape); err != nil {
			if ctx.Err() != nil {
				return
			}
			m.log.Warn("template not prepared to start from memory; its sandboxes boot", "template", t.Name, "error", err)
		}
	}
}
