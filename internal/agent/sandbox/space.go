package sandbox

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNoSpace means the file system under WRENN_DIR is too full for an
// operation. It is refused before anything changes, so a full disk costs a
// clear error and never a sandbox.
var ErrNoSpace = errors.New("not enough free disk space under WRENN_DIR")

// DefaultMinFreeMiB is the free space an operation must leave behind: room
// for records, logs and running guests' disks to grow a little.
const DefaultMinFreeMiB = 256

// freeMiB is the space an unprivileged writer may still use under dir.
func freeMiB(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("free space under %s: %w", dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize) >> 20, nil
}

// needSpace refuses an operation that would write about mib MiB under
// WRENN_DIR unless that much plus the reserve is free.
func (m *Manager) needSpace(what string, mib int) error {
	free, err := freeMiB(m.cfg.WrennDir)
	if err != nil {
		return err
	}
	want := int64(mib) + int64(m.cfg.MinFreeMiB)
	if free < want {
		return fmt.Errorf("%w: %s needs %d MiB free (%d MiB plus the %d MiB reserve), %d MiB are",
			ErrNoSpace, what, want, mib, m.cfg.MinFreeMiB, free)
	}
	return nil
}

// noSpace turns a write that failed on a full disk into ErrNoSpace, so the
// caller learns what to fix.
func noSpace(err error) error {
	if err != nil && (errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)) && !errors.Is(err, ErrNoSpace) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}

// continueStalledVMs lets VMs run again that their VMM stopped on a host
// write error, once the disk has room: QEMU stops a guest whose disk write
// hit ENOSPC rather than failing the write, so nothing in the guest is lost
// while the host is full. warned holds the sandboxes already reported; it
// belongs to the reaper's goroutine.
func (m *Manager) continueStalledVMs(ctx context.Context, warned map[string]bool) {
	free, err := freeMiB(m.cfg.WrennDir)
	if err != nil {
		return
	}
	for _, rec := range m.List() {
		if rec.State == Running {
			m.continueIfStalled(ctx, rec.ID, free, warned)
		}
	}
}

func (m *Manager) continueIfStalled(ctx context.Context, id string, freeMiB int64, warned map[string]bool) {
	e := m.tryLock(id)
	if e == nil {
		return // busy (a pause, a copy): look again next tick
	}
	defer e.mu.Unlock()
	rec := e.rec
	if rec.State != Running || !m.cfg.Driver.Alive(rec.Spec, rec.VMM) {
		return
	}
	// Bounded: the sandbox's lock is held, and a VMM may hang.
	askCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if stalled, err := m.cfg.Driver.Stalled(askCtx, rec.Spec, rec.VMM); err != nil || !stalled {
		delete(warned, id)
		return
	}
	if freeMiB < int64(m.cfg.MinFreeMiB) {
		if !warned[id] {
			m.log.Warn("sandbox stopped by a full disk under WRENN_DIR; it continues once space is freed",
				"sandbox", id, "free_mib", freeMiB, "need_mib", m.cfg.MinFreeMiB)
			warned[id] = true
		}
		return
	}
	if err := m.cfg.Driver.Thaw(askCtx, rec.Spec, rec.VMM); err != nil {
		m.log.Error("could not continue a sandbox stopped by a full disk", "sandbox", id, "error", err)
		return
	}
	delete(warned, id)
	m.log.Info("sandbox continues: the disk under WRENN_DIR has room again", "sandbox", id, "free_mib", freeMiB)
}
