package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/guest/template"
)

// A fork copies a running sandbox's memory and disk at one frozen moment
// into a hidden memory template ("fork-…"), and starts the new sandboxes
// from it like any memory template; the template goes with the last of
// them.

// forkPrefix names the hidden templates of forks.
const forkPrefix = "fork-"

// MaxFork bounds the sandboxes one fork makes.
const MaxFork = 16

// StartedFork is Record.StartedFrom for a sandbox forked from another.
const StartedFork = "fork"

// IsForkTemplate says whether a template is a fork's hidden one.
func IsForkTemplate(name string) bool { return strings.HasPrefix(name, forkPrefix) }

// Fork starts one sandbox per id with the memory and disk srcID has now.
// The source is frozen while its disk is copied and its memory saved, then
// runs on. Each new sandbox has the source's shape, environment, metadata
// and egress, and its own id, token, host name and randomness.
func (m *Manager) Fork(ctx context.Context, srcID string, ids []string, timeout time.Duration, autoPause bool) ([]Record, error) {
	if len(ids) < 1 || len(ids) > MaxFork {
		return nil, fmt.Errorf("%w: a fork makes 1 to %d sandboxes, not %d", ErrInvalid, MaxFork, len(ids))
	}
	seen := map[string]bool{}
	for _, id := range ids {
		if !validID.MatchString(id) || seen[id] {
			return nil, fmt.Errorf("%w: sandbox id %q: use 3-64 of a-z, 0-9 and '-', each once", ErrInvalid, id)
		}
		seen[id] = true
	}
	if timeout < 0 || timeout > MaxTimeout {
		return nil, fmt.Errorf("%w: timeout must be between 0 and %v", ErrInvalid, MaxTimeout)
	}
	if _, err := m.cloner(); err != nil {
		return nil, fmt.Errorf("%w: cannot fork: %v", ErrWrongState, err)
	}
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	name := forkPrefix + hex.EncodeToString(b[:])
	start := time.Now()

	e, err := m.lock(ctx, srcID)
	if err != nil {
		return nil, err
	}
	locked := true
	unlock := func() {
		if locked {
			e.mu.Unlock()
			locked = false
		}
	}
	defer unlock()
	rec := e.rec
	if rec.State != Running {
		return nil, fmt.Errorf("%w: %s is %s; only a running sandbox forks", ErrWrongState, srcID, rec.State)
	}
	if err := m.needSpace("forking "+srcID, (2+len(ids))*rec.MemoryMiB); err != nil {
		return nil, err
	}
	// The new sandboxes take their ids, slots and memory before the source
	// stops, and their networks are made while it is copied.
	kids, err := m.reserveForks(ctx, rec, name, ids, timeout, autoPause)
	if err != nil {
		return nil, err
	}
	nets := make(chan error, len(kids))
	for _, k := range kids {
		go func() { nets <- m.prepareNet(ctx, k) }()
	}
	netsDone := false
	waitNets := func() error {
		if netsDone {
			return nil
		}
		netsDone = true
		var err error
		for range kids {
			err = errors.Join(err, <-nets)
		}
		return err
	}
	launched := false
	defer func() {
		if !launched { // nothing of the fork is left
			_ = waitNets()
			m.unreserve(kids)
			m.deleteForkTemplate(name)
		}
	}()

	// The frozen moment: the disk copied, the memory saved.
	forkDisk := filepath.Join(m.sandboxDir(rec), name+".disk")
	memDir := filepath.Join(m.sandboxDir(rec), name+"-memory")
	inRAM := m.makeForkMemoryDir(name)
	if inRAM {
		memDir = filepath.Join(m.forkMemoryDir(name), "saved")
	}
	defer os.Remove(forkDisk)
	keepSaved := false // the single sandbox restores it, and the template keeps it
	defer func() {
		if !keepSaved {
			_ = os.RemoveAll(memDir)
		}
	}()
	origin, layered := m.forkOrigin(rec)
	copyDisk := flattenTo(rec, forkDisk)
	if layered {
		copyDisk = func(ctx context.Context) error {
			return m.cfg.Disks.(disk.Layers).CopyLayer(ctx, disk.Disk{Path: rec.Spec.Disk, Format: rec.Spec.DiskFormat}, rec.DiskBase, forkDisk)
		}
	}
	err = m.copyFrozen(ctx, e, copyDisk, memDir)
	unlock()
	frozen := time.Since(start)
	if err != nil {
		return nil, noSpace(err)
	}
	parent, _ := m.templates.Get(rec.Template)
	if _, err := m.templates.Adopt(ctx, name, forkDisk, template.Metadata{Source: "fork:" + srcID, Parent: origin, EnvdVersion: parent.EnvdVersion,
		Ephemeral: true, Layer: layered}); err != nil {
		return nil, noSpace(fmt.Errorf("fork %s: %w", srcID, err))
	}
	// One sandbox restores the saved VM directly; several share its memory
	// as a template (the conversion costs about as much as one restore).
	var state *savedState
	if len(ids) == 1 {
		// The saved state lives with the hidden template (a lazy restore
		// reads it after the VM runs) and goes with it.
		kept := memDir
		keepSaved = true
		if !inRAM {
			kept = filepath.Join(filepath.Dir(m.templates.RootfsPath(name)), "state")
			if err := os.Rename(memDir, kept); err != nil {
				return nil, fmt.Errorf("fork %s: %w", srcID, err)
			}
		}
		state = &savedState{dir: kept, mac: rec.Spec.MAC, token: rec.EnvdToken}
	} else if _, err := m.saveMemoryTemplate(ctx, name, rec, memDir, ""); err != nil {
		return nil, fmt.Errorf("fork %s: %w", srcID, err)
	}
	if err := waitNets(); err != nil {
		return nil, err
	}
	launched = true
	out := make([]Record, len(kids))
	errs := make([]error, len(kids))
	var wg sync.WaitGroup
	for i, k := range kids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], errs[i] = m.launch(ctx, k, state)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		// All or nothing: a caller asking for N gets N or an error.
		for i, id := range ids {
			if errs[i] == nil {
				_ = m.Destroy(context.WithoutCancel(ctx), id)
			}
		}
		m.dropForkTemplate(name)
		return nil, fmt.Errorf("fork %s: %w", srcID, err)
	}
	m.log.Info("sandbox forked", "sandbox", srcID, "into", ids, "frozen", frozen.Round(time.Millisecond), "layered", layered, "took", time.Since(start).Round(time.Millisecond))
	return out, nil
}

// forkOrigin is the template a fork of rec names as its origin, and
// whether the fork's disk can be a layer on rec's own base (what rec wrote,
// not the whole image): when the disk driver makes layers and rec's base is
// a template's lasting image. A fork of a fork is flattened: its base is
// a hidden template that goes with its own last sandbox.
func (m *Manager) forkOrigin(rec Record) (string, bool) {
	if IsForkTemplate(rec.Template) {
		parent, _ := m.templates.Get(rec.Template)
		return parent.Parent, false
	}
	_, layers := m.cfg.Disks.(disk.Layers)
	return rec.Template, layers && rec.Spec.DiskFormat == "qcow2" && rec.DiskBase != ""
}

// reserveForks takes the ids, network slots and memory of a fork's new
// sandboxes, each locked by the caller until it runs or is unreserved.
func (m *Manager) reserveForks(ctx context.Context, rec Record, tpl string, ids []string, timeout time.Duration, autoPause bool) ([]*entry, error) {
	if timeout == 0 {
		timeout = m.cfg.DefaultTimeout
	}
	var kids []*entry
	for _, id := range ids {
		p := CreateParams{ID: id, Template: tpl, VCPUs: rec.VCPUs, MemoryMiB: rec.MemoryMiB, DiskMiB: rec.DiskMiB,
			Timeout: timeout, AutoPause: autoPause, EnvVars: rec.EnvVars, Metadata: rec.Metadata, Egress: rec.Egress}
		k, err := m.reserve(p)
		for errors.Is(err, ErrNoCapacity) && m.evictMember(ctx) {
			k, err = m.reserve(p) // warm sandboxes give way to real ones
		}
		if err != nil {
			m.unreserve(kids)
			return nil, err
		}
		kids = append(kids, k)
	}
	return kids, nil
}

// prepareNet makes a reserved sandbox's network ahead of its create.
func (m *Manager) prepareNet(ctx context.Context, k *entry) error {
	if err := m.cfg.Net.Setup(ctx, k.rec.Net, k.rec.Egress); err != nil {
		return fmt.Errorf("sandbox %s: %w", k.rec.ID, err)
	}
	k.netUp = true
	return nil
}

// unreserve gives back what reserveForks (and prepareNet) took.
func (m *Manager) unreserve(kids []*entry) {
	for _, k := range kids {
		if k.netUp {
			_ = m.cfg.Net.Teardown(context.Background(), k.rec.Net)
		}
		m.forget(k.rec.ID, k.rec.Net.Slot)
		k.mu.Unlock()
	}
}

// deleteForkTemplate deletes a fork's hidden template and its memory.
func (m *Manager) deleteForkTemplate(name string) {
	if err := m.templates.Delete(name); err != nil && !errors.Is(err, template.ErrNotFound) {
		m.log.Warn("could not delete a fork's template", "template", name, "error", err)
	}
	if dir := m.forkMemoryDir(name); dir != "" {
		_ = os.RemoveAll(dir)
		_ = os.Remove(m.scratch) // once empty
	}
}

// forkMemoryDir is where fork template name keeps its memory when forks
// keep it in RAM (Config.MemoryScratch): the page faults of filling a new
// file cost several times less on a tmpfs than on a disk's file system,
// and the template lives only as long as its sandboxes.
func (m *Manager) forkMemoryDir(name string) string {
	if m.scratch == "" || !IsForkTemplate(name) {
		return ""
	}
	return filepath.Join(m.scratch, name)
}

// makeForkMemoryDir makes forkMemoryDir(name), or says why the fork keeps
// its memory on disk. The scratch directory is in one anyone may write
// (/dev/shm): it is used only as this user's own 0700 directory, checked
// after the fork's own is made in it (then it cannot be swapped).
func (m *Manager) makeForkMemoryDir(name string) bool {
	dir := m.forkMemoryDir(name)
	if dir == "" {
		return false
	}
	if err := os.Mkdir(m.scratch, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		m.log.Warn("the fork keeps its memory on disk", "dir", m.scratch, "error", err)
		return false
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		m.log.Warn("the fork keeps its memory on disk", "dir", dir, "error", err)
		return false
	}
	if !m.scratchIsOurs() {
		m.log.Warn("the fork keeps its memory on disk: its directory in RAM is not this user's own", "dir", m.scratch)
		_ = os.Remove(dir)
		return false
	}
	return true
}

// scratchIsOurs says whether the scratch directory is this user's own 0700
// directory, not a link or anyone else's.
func (m *Manager) scratchIsOurs() bool {
	fi, err := os.Lstat(m.scratch)
	return err == nil && fi.IsDir() && fi.Mode().Perm() == 0o700 && fi.Sys().(*syscall.Stat_t).Uid == uint32(os.Geteuid())
}

// dropForkTemplate deletes a fork's hidden template once no sandbox
// starts from it.
func (m *Manager) dropForkTemplate(name string) {
	if !IsForkTemplate(name) {
		return
	}
	for _, r := range m.List() {
		if r.Template == name {
			return
		}
	}
	m.deleteForkTemplate(name)
}

// dropForkTemplates deletes the hidden templates of forks no sandbox uses
// (a crash between a fork's copy and its sandboxes leaves one).
func (m *Manager) dropForkTemplates() {
	all, err := m.templates.List()
	if err != nil {
		return
	}
	for _, t := range all {
		m.dropForkTemplate(t.Name)
	}
	// Memory kept in RAM for templates that are gone.
	if m.scratch == "" || !m.scratchIsOurs() {
		return
	}
	entries, _ := os.ReadDir(m.scratch)
	for _, d := range entries {
		if _, err := m.templates.Get(d.Name()); err != nil && IsForkTemplate(d.Name()) {
			m.deleteForkTemplate(d.Name())
		}
	}
}
