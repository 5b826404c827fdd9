package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/safetext"
)

// Start prepares the host, takes back what an earlier agent left, and runs
// the reaper until ctx ends.
func (m *Manager) Start(ctx context.Context) error {
	for _, d := range []string{"sandboxes", "snapshots"} {
		if err := os.MkdirAll(filepath.Join(m.cfg.WrennDir, d), 0o700); err != nil {
			return fmt.Errorf("prepare %s: %w", d, err)
		}
	}
	m.privatize()
	if err := m.cfg.Net.PrepareHost(ctx); err != nil {
		return err
	}
	if err := m.reconcile(ctx); err != nil {
		return err
	}
	m.dropForkTemplates()
	m.dropInternalVMs(ctx)
	go m.reap(ctx)
	m.loadPools()
	go m.keepPools(ctx)
	return nil
}

// privatize makes tenant data on disk readable by the agent's user alone:
// sandbox and snapshot directories, and templates made from capsules
// (snapshots, builds), which earlier versions left readable by everyone.
// Shipped images (minimal, base) stay readable: they hold no tenant's data.
func (m *Manager) privatize() {
	tighten := func(root string) {
		_ = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.Type()&os.ModeSymlink != 0 {
				return nil
			}
			fi, err := d.Info()
			if err != nil {
				return nil
			}
			want := fi.Mode().Perm() &^ 0o077
			if d.IsDir() {
				want |= 0o700
			}
			if (d.IsDir() || fi.Mode().IsRegular()) && want != fi.Mode().Perm() {
				if err := os.Chmod(path, want); err != nil {
					m.log.Warn("cannot make tenant data private", "path", path, "error", err)
				}
			}
			return nil
		})
	}
	for _, d := range []string{"sandboxes", "snapshots"} {
		tighten(filepath.Join(m.cfg.WrennDir, d))
	}
	all, err := m.templates.List()
	if err != nil {
		return
	}
	for _, t := range all {
		if strings.HasPrefix(t.Source, "snapshot:") || strings.HasPrefix(t.Source, "build:") {
			tighten(filepath.Dir(m.templates.RootfsPath(t.Name)))
		}
	}
}

// maxErrorText bounds the reason a sandbox failed, as the control plane
// and its tenants read it.
const maxErrorText = 1024

// reconcile loads the saved sandboxes: running ones whose VMM still runs
// are adopted, paused ones are kept, anything half made or dead is cleaned
// up. Then it removes what no sandbox owns: namespaces and VMM processes.
func (m *Manager) reconcile(ctx context.Context) error {
	root := filepath.Join(m.cfg.WrennDir, "sandboxes")
	dirs, err := os.ReadDir(root)
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		dir := filepath.Join(root, d.Name())
		rec, err := readRecord(dir)
		if err != nil {
			m.log.Warn("removing unreadable sandbox directory", "dir", dir, "error", err)
			m.killVMMsUnder(dir)
			_ = os.RemoveAll(dir)
			continue
		}
		switch {
		case rec.State == Running && m.cfg.Driver.Alive(rec.Spec, rec.VMM):
			// A pause cut short by the agent's death may have stopped the
			// vCPUs: make sure the adopted VM runs.
			thawCtx, cancel := context.WithTimeout(ctx, 5*time.Second) // a hung VMM must not hold up the start
			if err := m.cfg.Driver.Thaw(thawCtx, rec.Spec, rec.VMM); err != nil {
				m.log.Warn("could not make sure the adopted sandbox runs", "sandbox", rec.ID, "error", err)
			}
			cancel()
			if a, ok := m.cfg.Driver.(vmm.Adopter); ok {
				a.Adopt(rec.Spec, rec.VMM)
			}
			_ = os.RemoveAll(m.snapshotDir(rec)) // what that pause had written
			if _, err := m.cfg.Console.Follow(rec.Spec.RunDir); err != nil {
				m.log.Warn("cannot read the adopted sandbox's console; its output is not kept", "sandbox", rec.ID, "error", err)
			}
			m.adopt(rec)
			m.log.Info("re-adopted running sandbox", "sandbox", rec.ID, "pid", rec.VMM.PID)
		case rec.State == Running && m.hasSnapshot(rec):
			// The pause finished but its record was not saved (a full
			// disk, a crash in between): the snapshot is the truth.
			m.killVMMsUnder(dir)
			rec.State, rec.VMM = Paused, vmm.Instance{}
			if err := writeRecord(dir, rec); err != nil {
				m.log.Warn("could not save the paused state", "sandbox", rec.ID, "error", err)
			}
			m.adopt(rec)
			m.log.Warn("kept sandbox as paused: its snapshot is complete but its record said running", "sandbox", rec.ID)
		case rec.State == Paused:
			if _, err := os.Stat(m.snapshotDir(rec)); err != nil {
				m.log.Error("paused sandbox has no snapshot; removing it", "sandbox", rec.ID)
				_ = m.teardown(ctx, rec)
				continue
			}
			// A resume cut short may have left a VMM restoring: the
			// snapshot is the truth, so that VMM goes.
			m.killVMMsUnder(dir)
			// After a reboot its device-mapper disk is gone: make it again
			// now, so a broken disk shows before anyone resumes it.
			if err := m.reattachDisk(ctx, rec); err != nil {
				m.log.Warn("cannot reattach the paused sandbox's disk; its resume will try again", "sandbox", rec.ID, "error", err)
			}
			m.adopt(rec)
			m.log.Info("kept paused sandbox", "sandbox", rec.ID)
		default:
			// Half created, or its VMM died with the host: nothing to keep running.
			m.log.Warn("cleaning up sandbox that did not survive", "sandbox", rec.ID, "state", rec.State)
			if err := m.teardown(ctx, rec); err != nil {
				m.log.Error("clean up failed", "sandbox", rec.ID, "error", err)
			}
		}
	}
	// Namespaces of slots no sandbox holds.
	slots, err := m.cfg.Net.Slots()
	if err != nil {
		return fmt.Errorf("reconcile namespaces: %w", err)
	}
	for _, slot := range slots {
		if _, owned := m.slots[slot]; owned || !m.cfg.Slots.Contains(slot) {
			continue // ours, or another agent's on this machine
		}
		if a, err := m.cfg.Net.Allocation(slot); err == nil {
			m.log.Warn("removing orphan network namespace", "netns", a.NetNS)
			_ = m.cfg.Net.Teardown(ctx, a)
		}
	}
	// What sandboxes own is named after their homes (a warm-pool member
	// taken by a create keeps its own).
	homes := map[string]*entry{}
	for _, e := range m.sandboxes {
		homes[e.rec.home()] = e
	}
	// Device-mapper disks of sandboxes that are gone.
	if m.cfg.Disks.Name() == "dm" {
		ids, err := disk.Orphans(ctx)
		if err != nil {
			m.log.Warn("cannot list device-mapper disks", "error", err)
		}
		for _, id := range ids {
			if _, owned := homes[id]; !owned {
				m.log.Warn("removing orphan device-mapper disk", "sandbox", id)
				_ = m.cfg.Disks.Release(ctx, filepath.Join(root, id, "rootfs.dm"))
			}
		}
	}
	// Control groups of VMMs that no longer run.
	if m.cfg.Cgroups != nil {
		for _, id := range m.cfg.Cgroups.EmptyGroups() {
			if e, owned := homes[id]; !owned || e.rec.State != Running {
				m.releaseCgroup(id)
			}
		}
	}
	// Snapshot directories of sandboxes that are gone.
	snaps, _ := os.ReadDir(filepath.Join(m.cfg.WrennDir, "snapshots"))
	for _, s := range snaps {
		if _, owned := homes[s.Name()]; !owned {
			_ = os.RemoveAll(filepath.Join(m.cfg.WrennDir, "snapshots", s.Name()))
		}
	}
	return nil
}

func (m *Manager) adopt(rec Record) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sandboxes[rec.ID] = &entry{mu: newOpLock(), rec: rec, view: rec}
	m.slots[rec.Net.Slot] = rec.ID
}

// killVMMsUnder kills VMM processes whose command line names dir, for
// sandboxes whose record was lost.
func (m *Manager) killVMMsUnder(dir string) {
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		if err != nil || !strings.Contains(string(cmdline), dir+"/") {
			continue
		}
		m.log.Warn("killing orphan VMM", "pid", pid, "dir", dir)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		// Wait for it to go, so its sockets and TAP are free for the next VMM.
		for range 50 {
			if _, err := os.Stat("/proc/" + p.Name()); err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// reap enforces deadlines: an expired sandbox is paused if it asked for
// that, destroyed otherwise.
func (m *Manager) reap(ctx context.Context) {
	t := time.NewTicker(m.cfg.ReapInterval)
	defer t.Stop()
	warned := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.noticeDeadVMMs()
		m.continueStalledVMs(ctx, warned)
		now := time.Now()
		for _, rec := range m.List() {
			if rec.State != Running || now.Before(rec.ExpiresAt) {
				continue
			}
			if rec.AutoPause {
				if _, err := m.pauseIfExpired(ctx, rec.ID); err != nil && !errors.Is(err, ErrNotFound) {
					m.log.Error("timeout: pause failed", "sandbox", rec.ID, "error", err)
				}
				continue
			}
			m.log.Info("timeout: destroying sandbox", "sandbox", rec.ID, "expired_at", rec.ExpiresAt)
			if err := m.destroyIfExpired(ctx, rec.ID); err != nil {
				m.log.Error("timeout: destroy failed", "sandbox", rec.ID, "error", err)
			}
		}
	}
}

// pauseIfExpired re-checks the deadline under the sandbox's lock: a ping may
// have arrived since the reaper looked. A sandbox busy with an operation is
// left for the next tick: the reaper never waits behind one.
func (m *Manager) pauseIfExpired(ctx context.Context, id string) (Record, error) {
	e := m.tryLock(id)
	if e == nil {
		return Record{}, nil
	}
	defer e.mu.Unlock()
	if e.rec.State != Running || time.Now().Before(e.rec.ExpiresAt) {
		return e.rec, nil
	}
	m.log.Info("timeout: pausing sandbox", "sandbox", id)
	return m.pause(ctx, e)
}

func (m *Manager) destroyIfExpired(ctx context.Context, id string) error {
	e := m.tryLock(id)
	if e == nil {
		return nil // gone, or busy: the next tick looks again
	}
	defer e.mu.Unlock()
	if e.rec.State != Running || time.Now().Before(e.rec.ExpiresAt) {
		return nil
	}
	if err := m.teardown(ctx, e.rec); err != nil {
		return err
	}
	m.forget(id, e.rec.Net.Slot)
	m.dropForkTemplate(e.rec.Template)
	return nil
}

// noticeDeadVMMs puts a running sandbox whose VMM has died (a crash, the
// OOM killer at its cgroup's limit, someone's kill -9) into Error with the
// reason, so that the control plane and the user learn it at once rather
// than from timeouts. Its disk stays until it is destroyed.
func (m *Manager) noticeDeadVMMs() {
	for _, rec := range m.List() {
		if rec.State != Running || m.cfg.Driver.Alive(rec.Spec, rec.VMM) {
			continue
		}
		e := m.tryLock(rec.ID)
		if e == nil {
			continue // busy: look again next tick
		}
		// Look again under the lock: a pause may have just stopped it.
		if e.rec.State == Running && !m.cfg.Driver.Alive(e.rec.Spec, e.rec.VMM) {
			reason := "its VMM (pid " + strconv.Itoa(e.rec.VMM.PID) + ") exited unexpectedly"
			if why := vmm.ExitReason(e.rec.Spec.RunDir); why != "" {
				reason = "the agent ended its VMM (pid " + strconv.Itoa(e.rec.VMM.PID) + "): " + why
			}
			if m.cfg.Cgroups != nil && m.cfg.Cgroups.OOMKilled(e.rec.Spec.ID) {
				reason += ": the kernel's out-of-memory killer ended it at its cgroup's memory limit (raise --vmm-overhead-mib)"
			}
			reason += "; its memory is lost, its disk is kept until it is destroyed; VMM log: " + vmm.LogTail(vmm.LogPath(e.rec.Spec.RunDir), 3)
			reason = safetext.Clip(reason, maxErrorText) // the log is the guest's words
			m.log.Error("sandbox's VMM died", "sandbox", e.rec.ID, "reason", reason)
			e.rec.State, e.rec.Error, e.rec.VMM = Error, reason, vmm.Instance{}
			if err := m.save(e); err != nil {
				m.log.Warn("could not save the error state", "sandbox", e.rec.ID, "error", err)
			}
			m.releaseCgroup(e.rec.Spec.ID)
		}
		e.mu.Unlock()
	}
}

// dropInternalVMs destroys the agent's own VMs a stopped agent left (a
// memory template being prepared): the work starts again if still asked.
func (m *Manager) dropInternalVMs(ctx context.Context) {
	m.mu.Lock()
	var ids []string
	for id, e := range m.sandboxes {
		if e.rec.Internal {
			ids = append(ids, id)
		}
	}
	m.mu.Unlock()
	for _, id := range ids {
		if err := m.Destroy(ctx, id); err != nil {
			m.log.Warn("could not remove a VM the agent left half used", "sandbox", id, "error", err)
		}
	}
}
