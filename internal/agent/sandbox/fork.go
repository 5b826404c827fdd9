package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

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
	m.mu.Lock()
	for _, id := range ids {
		if _, taken := m.sandboxes[id]; taken {
			m.mu.Unlock()
			return nil, fmt.Errorf("%w: %s", ErrExists, id)
		}
	}
	m.mu.Unlock()
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

	// The frozen moment: the disk flattened, the memory saved.
	e, err := m.lock(ctx, srcID)
	if err != nil {
		return nil, err
	}
	rec := e.rec
	disk := filepath.Join(m.sandboxDir(rec), name+".raw")
	memDir := filepath.Join(m.sandboxDir(rec), name+"-memory")
	defer os.Remove(disk)
	defer os.RemoveAll(memDir)
	err = func() error {
		defer e.mu.Unlock()
		if rec.State != Running {
			return fmt.Errorf("%w: %s is %s; only a running sandbox forks", ErrWrongState, srcID, rec.State)
		}
		if err := m.needSpace("forking "+srcID, 2*rec.MemoryMiB); err != nil {
			return err
		}
		return m.copyFrozen(ctx, e, disk, memDir)
	}()
	if err != nil {
		return nil, noSpace(err)
	}
	frozen := time.Since(start)
	parent, _ := m.templates.Get(rec.Template)
	origin := rec.Template
	if IsForkTemplate(origin) {
		origin = parent.Parent // a fork of a fork names the first template
	}
	if _, err := m.templates.Adopt(ctx, name, disk, template.Metadata{Source: "fork:" + srcID, Parent: origin, EnvdVersion: parent.EnvdVersion, Ephemeral: true}); err != nil {
		return nil, noSpace(fmt.Errorf("fork %s: %w", srcID, err))
	}
	// One sandbox restores the saved VM directly; several share its memory
	// as a template (the conversion costs about as much as one restore).
	var state *savedState
	if len(ids) == 1 {
		// The saved state lives with the hidden template (a lazy restore
		// reads it after the VM runs) and goes with it.
		kept := filepath.Join(filepath.Dir(m.templates.RootfsPath(name)), "state")
		if err := os.Rename(memDir, kept); err != nil {
			_ = m.templates.Delete(name)
			return nil, fmt.Errorf("fork %s: %w", srcID, err)
		}
		state = &savedState{dir: kept, mac: rec.Spec.MAC, token: rec.EnvdToken}
	} else if _, err := m.saveMemoryTemplate(ctx, name, rec, memDir, ""); err != nil {
		_ = m.templates.Delete(name)
		return nil, fmt.Errorf("fork %s: %w", srcID, err)
	}

	out := make([]Record, len(ids))
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], errs[i] = m.Create(ctx, CreateParams{ID: id, Template: name, VCPUs: rec.VCPUs, MemoryMiB: rec.MemoryMiB, DiskMiB: rec.DiskMiB,
				Timeout: timeout, AutoPause: autoPause, EnvVars: rec.EnvVars, Metadata: rec.Metadata, Egress: rec.Egress, state: state})
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
	m.log.Info("sandbox forked", "sandbox", srcID, "into", ids, "frozen", frozen.Round(time.Millisecond), "took", time.Since(start).Round(time.Millisecond))
	return out, nil
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
	if err := m.templates.Delete(name); err != nil && !errors.Is(err, template.ErrNotFound) {
		m.log.Warn("could not delete a fork's template", "template", name, "error", err)
	}
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
}
