package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/guest/template"
)

// Warm pools: per template, sandboxes started before anyone asks for
// them (from the template's memory when it has one), with envd up, a
// token, host name and kernel randomness of their own, and no caller yet.
// A create that fits a member (its template, shape, disk and default
// egress) takes it: one /init gives it the create's id, environment and
// fresh randomness, and the pool refills in the background. Members are
// not listed as sandboxes, count against the host's memory like any VM,
// and give way (the oldest is destroyed) when a create needs their room.

// StartedPool is Record.StartedFrom of a sandbox taken from a warm pool.
const StartedPool = "pool"

// poolPrefix starts a member's own name, its home for life (Record.Dir).
const poolPrefix = "wp-"

// poolTick is how often pools are checked when nothing asks for it sooner.
const poolTick = 2 * time.Second

// PoolSpec asks for Size warm sandboxes of Template on this host. The
// members have the template's memory shape; a template without memory
// needs an explicit one.
type PoolSpec struct {
	Template  string
	Size      int
	VCPUs     int
	MemoryMiB int
	DiskMiB   int
}

// MaxPoolSize bounds one template's pool on one host.
const MaxPoolSize = 64

// ParsePools reads "name:size[:vcpus:memory_mib:disk_mib],..." (the
// agent's --warm-pools); "" is none.
func ParsePools(s string) ([]PoolSpec, error) {
	items, err := parseSpecList(s, "name:size or name:size:vcpus:memory_mib:disk_mib", 1, 4)
	if err != nil {
		return nil, err
	}
	var out []PoolSpec
	for _, it := range items {
		spec := PoolSpec{Template: it.name, Size: it.nums[0]}
		if len(it.nums) == 4 {
			spec.VCPUs, spec.MemoryMiB, spec.DiskMiB = it.nums[1], it.nums[2], it.nums[3]
		}
		if err := spec.validate(); err != nil {
			return nil, fmt.Errorf("%q: %w", it.raw, err)
		}
		out = append(out, spec)
	}
	return out, nil
}

func (p PoolSpec) validate() error {
	if p.Size < 0 || p.Size > MaxPoolSize {
		return fmt.Errorf("%w: a warm pool holds 0 to %d sandboxes, not %d", ErrInvalid, MaxPoolSize, p.Size)
	}
	if p.VCPUs == 0 && p.MemoryMiB == 0 && p.DiskMiB == 0 {
		return nil // the template's memory shape
	}
	if p.VCPUs < 1 || p.VCPUs > MaxVCPUs || p.MemoryMiB < MinMemoryMiB || p.DiskMiB < 0 || p.DiskMiB > MaxDiskMiB {
		return fmt.Errorf("%w: a pool's shape needs 1-%d vCPUs, at least %d MiB of memory and at most %d MiB of disk", ErrInvalid, MaxVCPUs, MinMemoryMiB, MaxDiskMiB)
	}
	return nil
}

// PoolStatus is one template's pool on this host.
type PoolStatus struct {
	Template  string
	Size      int // members wanted
	Ready     int // members a create can take now
	Starting  int
	VCPUs     int
	MemoryMiB int // each member's
	DiskMiB   int
	Claims    int64  // creates served from the pool since the agent started
	Misses    int64  // creates of the template that found no fitting member
	Note      string // why the pool cannot fill, if it cannot
}

// pools is the manager's warm-pool state.
type pools struct {
	mu       sync.Mutex
	operator map[string]PoolSpec // --warm-pools
	cp       map[string]PoolSpec // the control plane's settings; win over the operator's
	notes    map[string]string
	claims   map[string]int64
	misses   map[string]int64
	kick     chan struct{}
	// fill is held while a member is made and while a template is
	// deleted, so that no member starts from a template going away.
	fill sync.Mutex
}

func newPools(operator []PoolSpec) *pools {
	p := &pools{operator: map[string]PoolSpec{}, cp: map[string]PoolSpec{}, notes: map[string]string{},
		claims: map[string]int64{}, misses: map[string]int64{}, kick: make(chan struct{}, 1)}
	for _, s := range operator {
		p.operator[s.Template] = s
	}
	return p
}

// wanted is every template's pool as it should be.
func (p *pools) wanted() map[string]PoolSpec {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]PoolSpec{}
	for k, v := range p.operator {
		out[k] = v
	}
	for k, v := range p.cp {
		out[k] = v
	}
	return out
}

func (p *pools) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *pools) note(tpl, why string) (changed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	changed = p.notes[tpl] != why
	if why == "" {
		delete(p.notes, tpl)
	} else {
		p.notes[tpl] = why
	}
	return changed
}

// SetPools replaces the control plane's pool settings (templates it does
// not name keep the operator's); members beyond them are drained.
func (m *Manager) SetPools(specs []PoolSpec) error {
	cp := map[string]PoolSpec{}
	for _, s := range specs {
		if err := template.ValidateName(s.Template); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		if err := s.validate(); err != nil {
			return err
		}
		cp[s.Template] = s
	}
	m.pools.mu.Lock()
	defer m.pools.mu.Unlock()
	if maps.Equal(m.pools.cp, cp) {
		return nil
	}
	// Kept on disk: an agent restarted keeps its members until the
	// control plane says otherwise.
	data, err := json.Marshal(specs)
	if err != nil {
		return err
	}
	path := filepath.Join(m.cfg.WrennDir, poolsFile)
	if err := os.WriteFile(path+".tmp", data, 0o600); err != nil {
		return fmt.Errorf("save the warm pools: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("save the warm pools: %w", err)
	}
	m.pools.cp = cp
	m.pools.wake()
	return nil
}

// poolsFile holds the control plane's last pool settings under WRENN_DIR.
const poolsFile = "warm-pools.json"

// loadPools reads the control plane's last pool settings.
func (m *Manager) loadPools() {
	data, err := os.ReadFile(filepath.Join(m.cfg.WrennDir, poolsFile))
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	var specs []PoolSpec
	if err == nil {
		err = json.Unmarshal(data, &specs)
	}
	if err != nil {
		m.log.Warn("ignoring the saved warm-pool settings", "error", err)
		return
	}
	m.pools.mu.Lock()
	defer m.pools.mu.Unlock()
	for _, s := range specs {
		if template.ValidateName(s.Template) == nil && s.validate() == nil {
			m.pools.cp[s.Template] = s
		}
	}
}

// Pools reports every pool this host keeps or has members of.
func (m *Manager) Pools() []PoolStatus {
	want := m.pools.wanted()
	seen := templateReads{}
	byTpl := map[string]*PoolStatus{}
	get := func(name string) *PoolStatus {
		if s := byTpl[name]; s != nil {
			return s
		}
		s := &PoolStatus{Template: name}
		if w, ok := want[name]; ok {
			s.Size = w.Size
			s.VCPUs, s.MemoryMiB, s.DiskMiB = m.poolShape(seen, w)
		}
		byTpl[name] = s
		return s
	}
	for name := range want {
		get(name)
	}
	for _, rec := range m.members() {
		s := get(rec.Pool)
		if rec.State == Running {
			s.Ready++
		} else if rec.State == Pending || rec.State == Starting {
			s.Starting++
		}
	}
	m.pools.mu.Lock()
	out := make([]PoolStatus, 0, len(byTpl))
	for name, s := range byTpl {
		s.Claims, s.Misses, s.Note = m.pools.claims[name], m.pools.misses[name], m.pools.notes[name]
		out = append(out, *s)
	}
	m.pools.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Template < out[j].Template })
	return out
}

// templateReads holds each template's metadata as read once in a pass
// over the pools (it is a file read; a pass looks at every member).
type templateReads map[string]templateRead

type templateRead struct {
	tpl template.Metadata
	err error
}

// poolTemplate is template name's metadata, read at most once per seen.
func (m *Manager) poolTemplate(seen templateReads, name string) (template.Metadata, error) {
	r, ok := seen[name]
	if !ok {
		r.tpl, r.err = m.templates.Get(name)
		seen[name] = r
	}
	return r.tpl, r.err
}

// poolShape is a pool's member shape: its own, else its template's memory.
func (m *Manager) poolShape(seen templateReads, s PoolSpec) (vcpus, memoryMiB, diskMiB int) {
	if s.VCPUs > 0 {
		return s.VCPUs, s.MemoryMiB, s.DiskMiB
	}
	if tpl, err := m.poolTemplate(seen, s.Template); err == nil && tpl.Memory != nil {
		return tpl.Memory.VCPUs, tpl.Memory.MemoryMiB, tpl.Memory.DiskMiB
	}
	return 0, 0, 0
}

// members are the pool members no create has taken, by name.
func (m *Manager) members() []Record {
	m.mu.Lock()
	var out []Record
	for _, e := range m.sandboxes {
		if e.view.Pool != "" {
			out = append(out, e.view)
		}
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// templateVersion names a template's content: a member made from another
// version is drained.
func templateVersion(tpl template.Metadata) string {
	v := tpl.Created.UTC().Format(time.RFC3339Nano) + "/" + tpl.SHA256
	if tpl.Memory != nil {
		v += "/" + tpl.Memory.Created.UTC().Format(time.RFC3339Nano)
	}
	return v
}

// keepPools makes and drains members until ctx ends.
func (m *Manager) keepPools(ctx context.Context) {
	t := time.NewTicker(poolTick)
	defer t.Stop()
	for {
		for m.tendPools(ctx) && ctx.Err() == nil {
			// One member at a time, then look again: creates that need
			// the host's cores go first.
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.pools.kick:
		}
	}
}

// tendPools drains what no pool wants and makes at most one member; it
// reports whether it made one (and so should run again at once).
func (m *Manager) tendPools(ctx context.Context) bool {
	want := m.pools.wanted()
	seen := templateReads{}
	have := map[string]int{}
	for _, rec := range m.members() {
		w, wanted := want[rec.Pool]
		tpl, err := m.poolTemplate(seen, rec.Pool)
		stale := err != nil || templateVersion(tpl) != rec.PoolVersion
		v, mem, disk := m.poolShape(seen, w)
		reshaped := rec.VCPUs != v || rec.MemoryMiB != mem || rec.DiskMiB != disk
		dead := rec.State == Error || rec.State == Stopped || rec.State == Paused ||
			rec.State == Running && !m.cfg.Driver.Alive(rec.Spec, rec.VMM)
		switch {
		case rec.State == Pending || rec.State == Starting:
			have[rec.Pool]++
			continue
		case !wanted || stale || reshaped || dead || have[rec.Pool] >= w.Size:
			why := "the pool is smaller now"
			switch {
			case !wanted:
				why = "no pool wants it"
			case dead:
				why = "its VM is not running"
			case stale:
				why = "its template changed"
			case reshaped:
				why = "the pool's shape changed"
			}
			m.log.Info("warm pool: draining a member", "template", rec.Pool, "member", rec.ID, "why", why)
			if err := m.Destroy(ctx, rec.ID); err != nil {
				m.log.Warn("warm pool: could not drain a member", "member", rec.ID, "error", err)
			}
			continue
		}
		have[rec.Pool]++
	}
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if have[name] >= want[name].Size {
			continue
		}
		if err := m.addMember(ctx, want[name]); err != nil {
			if m.pools.note(name, err.Error()) {
				m.log.Warn("warm pool cannot fill", "template", name, "error", err)
			}
			continue
		}
		m.pools.note(name, "")
		return true
	}
	return false
}

// addMember starts one member of spec's pool.
func (m *Manager) addMember(ctx context.Context, spec PoolSpec) error {
	m.pools.fill.Lock()
	defer m.pools.fill.Unlock()
	seen := templateReads{}
	tpl, err := m.poolTemplate(seen, spec.Template)
	if err != nil {
		return fmt.Errorf("template %s is not on this host", spec.Template)
	}
	v, mem, disk := m.poolShape(seen, spec)
	if v == 0 {
		return fmt.Errorf("template %s has no memory snapshot to take the pool's shape from: give the pool a shape (name:size:vcpus:memory_mib:disk_mib)", spec.Template)
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	p := CreateParams{ID: poolPrefix + hex.EncodeToString(b[:]), Template: spec.Template, VCPUs: v, MemoryMiB: mem, DiskMiB: disk,
		Timeout: MaxTimeout, pool: spec.Template, poolVersion: templateVersion(tpl)}
	if err := m.validate(&p); err != nil {
		return err
	}
	if err := m.needSpace("a warm-pool sandbox", p.MemoryMiB); err != nil {
		return err
	}
	e, err := m.reserve(p)
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	start := time.Now()
	rec, err := m.create(ctx, e, nil)
	if err != nil {
		m.forget(p.ID, e.rec.Net.Slot)
		return noSpace(err)
	}
	m.log.Info("warm pool: member ready", "template", rec.Pool, "member", rec.ID, "from", rec.StartedFrom, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// fitsMember says whether a create can take member rec.
func fitsMember(rec Record, p CreateParams) bool {
	return rec.Pool == p.Template && rec.State == Running && p.state == nil &&
		rec.VCPUs == p.VCPUs && rec.MemoryMiB == p.MemoryMiB && rec.DiskMiB == p.DiskMiB &&
		sameEgress(rec.Egress, p.Egress)
}

func sameEgress(a, b egress.Policy) bool {
	return a.Mode == b.Mode && slices.Equal(a.Allow, b.Allow) && slices.Equal(a.Deny, b.Deny)
}

// fromPool hands a fitting member to the create p, under p's id, and
// returns it; ok is false when there is none (or it failed, and is gone).
func (m *Manager) fromPool(ctx context.Context, p CreateParams) (rec Record, ok bool, err error) {
	if p.pool != "" {
		return Record{}, false, nil
	}
	m.mu.Lock()
	if _, taken := m.sandboxes[p.ID]; taken {
		m.mu.Unlock()
		return Record{}, false, fmt.Errorf("%w: %s", ErrExists, p.ID)
	}
	var e *entry
	var name string
	wanted := false
	for id, c := range m.sandboxes {
		if c.view.Pool != p.Template {
			continue
		}
		wanted = true
		// TryLock: a member busy with anything else is not for taking.
		if fitsMember(c.view, p) && c.mu.TryLock() {
			e, name = c, id
			break
		}
	}
	if e != nil {
		delete(m.sandboxes, name)
		m.sandboxes[p.ID] = e
		m.slots[e.rec.Net.Slot] = p.ID
	}
	m.mu.Unlock()
	if e == nil {
		if wanted || m.pools.wanted()[p.Template].Size > 0 {
			m.pools.mu.Lock()
			m.pools.misses[p.Template]++
			m.pools.mu.Unlock()
		}
		return Record{}, false, nil
	}
	defer e.mu.Unlock()
	defer m.pools.wake()
	start := time.Now()
	r := &e.rec
	before := *r
	r.Dir, r.ID, r.Pool, r.PoolVersion = r.home(), p.ID, "", ""
	r.Metadata, r.EnvVars, r.AutoPause, r.Timeout = p.Metadata, p.EnvVars, p.AutoPause, p.Timeout
	r.StartedFrom, r.BootNote = StartedPool, ""
	r.CreatedAt = time.Now().UTC()
	r.ExpiresAt = r.CreatedAt.Add(r.Timeout)
	// Who it is now, and randomness no other member has seen.
	err = m.initGuest(ctx, r, guestGreeting{first: true, clone: true})
	if err == nil {
		err = m.save(e)
	}
	if err != nil {
		m.log.Warn("warm pool: a member failed as it was taken; starting afresh", "template", p.Template, "member", before.ID, "error", err)
		if terr := m.teardown(context.WithoutCancel(ctx), *r); terr != nil {
			m.log.Warn("warm pool: could not remove the failed member", "member", before.ID, "error", terr)
		}
		m.forget(p.ID, r.Net.Slot)
		return Record{}, false, nil
	}
	m.pools.mu.Lock()
	m.pools.claims[p.Template]++
	m.pools.mu.Unlock()
	m.log.Info("sandbox running", "sandbox", r.ID, "template", r.Template, "from", "warm pool", "member", before.ID, "took", time.Since(start).Round(time.Millisecond))
	return *r, true, nil
}

// evictMember destroys the oldest ready member of any pool, to make room
// for a create; it reports whether there was one.
func (m *Manager) evictMember(ctx context.Context) bool {
	list := m.members()
	sort.Slice(list, func(i, j int) bool { return list[i].CreatedAt.Before(list[j].CreatedAt) })
	for _, rec := range list {
		if rec.State != Running {
			continue
		}
		m.log.Info("warm pool: giving a member's room to a create", "template", rec.Pool, "member", rec.ID)
		if err := m.Destroy(ctx, rec.ID); err == nil {
			return true
		}
	}
	return false
}

// drainPool destroys every member of template name's pool; the caller
// holds m.pools.fill.
func (m *Manager) drainPool(ctx context.Context, name string) error {
	var errs []error
	for _, rec := range m.members() {
		if rec.Pool == name {
			if err := m.Destroy(ctx, rec.ID); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
