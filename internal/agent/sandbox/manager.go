// Package sandbox is the host agent's sandbox manager. Each lifecycle
// operation is a short series of steps (directory, disk, network, VMM,
// envd); a failed create undoes exactly the steps it took, and state is
// saved after each change so that a restarted agent re-adopts what still
// runs and cleans up what a crash left half made.
package sandbox

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/envvars"
	"github.com/wrenn/wrenn/internal/guest/kernel"
	"github.com/wrenn/wrenn/internal/guest/template"
)

// Errors the API maps to status codes.
var (
	ErrNotFound      = errors.New("sandbox not found")
	ErrInvalid       = errors.New("invalid request")
	ErrExists        = errors.New("sandbox already exists")
	ErrWrongState    = errors.New("sandbox is not in a state that allows this")
	ErrNoCapacity    = errors.New("host has no capacity left")
	ErrTemplateUnkwn = errors.New("unknown template")
	ErrBusy          = errors.New("sandbox is busy")
)

// Limits on what one sandbox may ask for.
const (
	MinMemoryMiB = 128
	MaxVCPUs     = 32 // the guest kernel's NR_CPUS
	MaxTimeout   = 30 * 24 * time.Hour
	MaxDiskMiB   = 1 << 20 // 1 TiB
	maxMetadata  = 64
)

// Config wires the manager to a host.
type Config struct {
	WrennDir       string
	Driver         vmm.Driver
	Disks          disk.Cloner
	Net            Network
	Log            *slog.Logger
	DNS            []netip.Addr  // resolvers the guests use
	DefaultTimeout time.Duration // when a create names none
	BootTimeout    time.Duration // VMM start to envd ready
	HostMemoryMiB  int           // capacity for running sandboxes
	ReapInterval   time.Duration
	// Cgroups holds the VMMs' control groups (see package cgroup); nil
	// when the agent runs without them.
	Cgroups Cgroups
	// MinFreeMiB is the disk space under WrennDir that creates, pauses and
	// resumes leave free (DefaultMinFreeMiB when 0; see needSpace).
	MinFreeMiB int
	// Slots this agent may use (default all); see network.SlotRange.
	Slots network.SlotRange
	// Console is how the VMMs' output is kept; the manager reads adopted
	// VMMs' consoles again with it.
	Console vmm.ConsoleLog
	// WarmPools are the operator's warm pools (--warm-pools); the control
	// plane's settings (SetPools) win over them.
	WarmPools []PoolSpec
	// MemoryScratch, when set, is a tmpfs (such as /dev/shm) where forks
	// keep the memory they copy while their sandboxes live, in a directory
	// of this manager's own (named for WrennDir). "" keeps it on disk.
	MemoryScratch string
}

// Network makes and removes sandbox networks: package network's Manager
// on a host, a stand-in in unit tests (which cannot make namespaces).
type Network interface {
	// Allocation is the network a slot gets (its namespace, addresses).
	Allocation(slot int) (network.Allocation, error)
	// PrepareHost sets what every sandbox network needs, at each start.
	PrepareHost(ctx context.Context) error
	Setup(ctx context.Context, a network.Allocation, egress egress.Policy) error
	// Teardown removes a network; removing one that is gone is no error.
	Teardown(ctx context.Context, a network.Allocation) error
	Exists(a network.Allocation) bool
	// Slots lists the slots whose networks exist on the host, made by any
	// agent, so that one can remove those no sandbox owns.
	Slots() ([]int, error)
	// ScratchTap adds a network card with nothing behind it to a
	// sandbox's network, for a VMM that only converts saved state.
	ScratchTap(ctx context.Context, a network.Allocation, name string) (remove func(), err error)
}

// Cgroups are the VMMs' control groups, one per sandbox, named by its id.
type Cgroups interface {
	Remove(id string) error
	EmptyGroups() []string
	// OOMKilled reports whether the kernel's OOM killer ended a process
	// in the group at its memory limit.
	OOMKilled(id string) bool
}

// releaseCgroup removes a sandbox's control group once its VMM is gone.
func (m *Manager) releaseCgroup(id string) {
	if m.cfg.Cgroups == nil {
		return
	}
	if err := m.cfg.Cgroups.Remove(id); err != nil {
		m.log.Warn("could not remove the VMM's cgroup", "sandbox", id, "error", err)
	}
}

// discardVMM stops a VMM whose work is abandoned (a resume that failed
// half way) and frees its cgroup.
func (m *Manager) discardVMM(spec vmm.Spec, inst vmm.Instance) {
	_ = m.cfg.Driver.Stop(context.Background(), spec, inst)
	m.releaseCgroup(spec.ID)
}

// Manager owns the sandboxes of one host.
type Manager struct {
	cfg       Config
	log       *slog.Logger
	templates template.Store

	mu        sync.Mutex
	sandboxes map[string]*entry
	slots     map[int]string
	pools     *pools
	// scratch is where forks keep memory templates in RAM ("" on disk).
	scratch string
}

// entry serialises operations on one sandbox. rec belongs to whoever holds
// mu; view is a copy published under the manager's lock on every save, for
// listings that must not wait behind a slow operation.
type entry struct {
	mu   opLock
	rec  Record
	view Record
	envd *envdclient.Client // made on first use, under the manager's lock
	// netUp: the network is made already (a fork's new sandboxes get
	// theirs while the source is frozen); create skips it.
	netUp bool
}

// opLock is a sandbox's operation lock. Unlike a sync.Mutex, a caller
// can give up waiting for it (LockContext): a request for a sandbox that
// is being created waits no longer than its caller wants.
type opLock struct{ ch chan struct{} }

func newOpLock() opLock { return opLock{ch: make(chan struct{}, 1)} }

func (l opLock) Lock()   { l.ch <- struct{}{} }
func (l opLock) Unlock() { <-l.ch }

// TryLock takes the lock if it is free.
func (l opLock) TryLock() bool {
	select {
	case l.ch <- struct{}{}:
		return true
	default:
		return false
	}
}

// LockContext waits for the lock until ctx ends.
func (l opLock) LockContext(ctx context.Context) error {
	select {
	case l.ch <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: the sandbox is busy with another operation: %w", ErrBusy, ctx.Err())
	}
}

// save persists e.rec and publishes it to listings.
func (m *Manager) save(e *entry) error {
	if err := writeRecord(m.sandboxDir(e.rec), e.rec); err != nil {
		return err
	}
	m.mu.Lock()
	e.view = e.rec
	m.mu.Unlock()
	return nil
}

// show publishes a passing state to listings without saving it, until
// the returned func publishes the record again.
func (m *Manager) show(e *entry, st State) (done func()) {
	m.mu.Lock()
	v := e.rec
	v.State = st
	e.view = v
	m.mu.Unlock()
	return func() {
		m.mu.Lock()
		e.view = e.rec
		m.mu.Unlock()
	}
}

// New returns a manager; call Start before serving.
func New(cfg Config) *Manager {
	if cfg.DefaultTimeout == 0 {
		cfg.DefaultTimeout = 5 * time.Minute
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 90 * time.Second
	}
	if cfg.ReapInterval == 0 {
		cfg.ReapInterval = 2 * time.Second
	}
	if cfg.MinFreeMiB == 0 {
		cfg.MinFreeMiB = DefaultMinFreeMiB
	}
	if cfg.Slots == (network.SlotRange{}) {
		cfg.Slots = network.AllSlots
	}
	scratch := ""
	if cfg.MemoryScratch != "" {
		abs, _ := filepath.Abs(cfg.WrennDir)
		sum := sha256.Sum256([]byte(abs))
		scratch = filepath.Join(cfg.MemoryScratch, "wrenn-forks-"+hex.EncodeToString(sum[:6]))
	}
	return &Manager{
		cfg: cfg, log: cfg.Log, pools: newPools(cfg.WarmPools), scratch: scratch,
		templates: template.Store{Dir: filepath.Join(cfg.WrennDir, "images")},
		sandboxes: map[string]*entry{}, slots: map[int]string{},
	}
}

// sandboxDir and snapshotDir are where a sandbox's files are: under its
// home, the name it was made under (see Record.Dir).
func (m *Manager) sandboxDir(rec Record) string {
	return filepath.Join(m.cfg.WrennDir, "sandboxes", rec.home())
}
func (m *Manager) snapshotDir(rec Record) string {
	return filepath.Join(m.cfg.WrennDir, "snapshots", rec.home())
}

// snapshotDone marks a snapshot the driver finished writing.
const snapshotDone = "complete"

func (m *Manager) hasSnapshot(rec Record) bool {
	_, err := os.Stat(filepath.Join(m.snapshotDir(rec), snapshotDone))
	return err == nil
}

// CreateParams is a request for a new sandbox.
type CreateParams struct {
	ID        string
	Template  string
	VCPUs     int
	MemoryMiB int
	DiskMiB   int // 0: the template's size
	Timeout   time.Duration
	AutoPause bool
	EnvVars   map[string]string
	Metadata  map[string]string
	Egress    egress.Policy
	// state, for a fork's single sandbox: start by restoring this saved
	// VM (with the template's image as its disk) instead of booting.
	state *savedState
	// pool and poolVersion make a warm-pool member of that template.
	pool, poolVersion string
	// internal: the agent's own VM, not listed (Record.Internal).
	internal bool
}

// savedState is a VM saved by Driver.SaveMemory, with what its guest
// knows of itself: its network card and envd token.
type savedState struct {
	dir, mac, token string
}

var validID = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{2,63}$`)

func (m *Manager) validate(p *CreateParams) error {
	if p.ID == "" {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return err
		}
		p.ID = "sb-" + hex.EncodeToString(b[:])
	}
	if !validID.MatchString(p.ID) {
		return fmt.Errorf("%w: sandbox id %q: use 3-64 of a-z, 0-9 and '-'", ErrInvalid, p.ID)
	}
	if p.Template == "" {
		return fmt.Errorf("%w: template is required", ErrInvalid)
	}
	if err := template.ValidateName(p.Template); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	tpl, err := m.templates.Get(p.Template)
	if err != nil {
		if errors.Is(err, template.ErrNotFound) {
			return fmt.Errorf("%w: %q is not on this host", ErrTemplateUnkwn, p.Template)
		}
		return fmt.Errorf("template %q: %w", p.Template, err)
	}
	tplMiB := int((tpl.SizeBytes + 1<<20 - 1) >> 20)
	switch {
	case p.DiskMiB == 0:
		p.DiskMiB = tplMiB
	case p.DiskMiB < tplMiB:
		return fmt.Errorf("%w: disk_size_mib %d is smaller than template %s's %d MiB", ErrInvalid, p.DiskMiB, p.Template, tplMiB)
	case p.DiskMiB > MaxDiskMiB:
		return fmt.Errorf("%w: disk_size_mib %d is more than %d", ErrInvalid, p.DiskMiB, MaxDiskMiB)
	}
	if p.VCPUs < 1 || p.VCPUs > MaxVCPUs {
		return fmt.Errorf("%w: vcpus must be between 1 and %d, not %d", ErrInvalid, MaxVCPUs, p.VCPUs)
	}
	if p.MemoryMiB < MinMemoryMiB {
		return fmt.Errorf("%w: memory_mib must be at least %d, not %d", ErrInvalid, MinMemoryMiB, p.MemoryMiB)
	}
	if m.cfg.HostMemoryMiB > 0 && p.MemoryMiB > m.cfg.HostMemoryMiB {
		return fmt.Errorf("%w: memory_mib %d is more than this host's %d", ErrInvalid, p.MemoryMiB, m.cfg.HostMemoryMiB)
	}
	if p.Timeout < 0 || p.Timeout > MaxTimeout {
		return fmt.Errorf("%w: timeout must be between 0 and %v", ErrInvalid, MaxTimeout)
	}
	if p.Timeout == 0 {
		p.Timeout = m.cfg.DefaultTimeout
	}
	if err := envvars.Validate(p.EnvVars); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if len(p.Metadata) > maxMetadata {
		return fmt.Errorf("%w: at most %d metadata entries", ErrInvalid, maxMetadata)
	}
	for k, v := range p.Metadata {
		if k == "" || len(k) > 128 || len(v) > 1024 {
			return fmt.Errorf("%w: metadata %q: keys 1-128 bytes, values up to 1024", ErrInvalid, k)
		}
	}
	if p.Egress.Mode == "" {
		p.Egress.Mode = egress.AllowAll
	}
	if err := p.Egress.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

// reserve registers a new sandbox under the lowest free slot.
func (m *Manager) reserve(p CreateParams) (*entry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.sandboxes[p.ID]; ok {
		return nil, fmt.Errorf("%w: %s", ErrExists, p.ID)
	}
	if m.cfg.HostMemoryMiB > 0 {
		used := 0
		for _, e := range m.sandboxes {
			// The view: e.rec belongs to whoever holds e.mu.
			if e.view.State != Paused {
				used += e.view.MemoryMiB
			}
		}
		if used+p.MemoryMiB > m.cfg.HostMemoryMiB {
			return nil, fmt.Errorf("%w: %d MiB requested, %d of %d MiB in use", ErrNoCapacity, p.MemoryMiB, used, m.cfg.HostMemoryMiB)
		}
	}
	slot := m.cfg.Slots.First
	for ; slot <= m.cfg.Slots.Last; slot++ {
		if _, taken := m.slots[slot]; !taken {
			break
		}
	}
	if slot > m.cfg.Slots.Last {
		return nil, fmt.Errorf("%w: all network slots %d-%d are in use", ErrNoCapacity, m.cfg.Slots.First, m.cfg.Slots.Last)
	}
	alloc, err := m.cfg.Net.Allocation(slot)
	if err != nil {
		return nil, fmt.Errorf("%w: no free network slot", ErrNoCapacity)
	}
	var tok [24]byte
	if _, err := rand.Read(tok[:]); err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	e := &entry{mu: newOpLock(), rec: Record{
		ID: p.ID, Template: p.Template, State: Pending, VCPUs: p.VCPUs, MemoryMiB: p.MemoryMiB, DiskMiB: p.DiskMiB,
		CreatedAt: now, ExpiresAt: now.Add(p.Timeout), Timeout: p.Timeout, AutoPause: p.AutoPause,
		Metadata: p.Metadata, EnvVars: p.EnvVars, Egress: p.Egress,
		EnvdToken: hex.EncodeToString(tok[:]), Net: alloc, Pool: p.pool, PoolVersion: p.poolVersion, Internal: p.internal,
	}}
	e.view = e.rec
	e.mu.Lock() // held by the creator until the sandbox runs or is gone
	m.sandboxes[p.ID] = e
	m.slots[slot] = p.ID
	return e, nil
}

func (m *Manager) forget(id string, slot int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.sandboxes[id]; e != nil && e.envd != nil {
		e.envd.Close()
	}
	delete(m.sandboxes, id)
	if m.slots[slot] == id {
		delete(m.slots, slot)
	}
}

// Create boots a new sandbox and returns once envd inside it is ready.
func (m *Manager) Create(ctx context.Context, p CreateParams) (Record, error) {
	if err := m.validate(&p); err != nil {
		return Record{}, err
	}
	if rec, ok, err := m.fromPool(ctx, p); ok || err != nil {
		return rec, err
	}
	// Room to pause it later is part of what a sandbox needs.
	if err := m.needSpace("a new sandbox", p.MemoryMiB); err != nil {
		return Record{}, err
	}
	e, err := m.reserve(p)
	for errors.Is(err, ErrNoCapacity) && m.evictMember(ctx) {
		e, err = m.reserve(p) // warm sandboxes give way to real ones
	}
	if err != nil {
		return Record{}, err
	}
	return m.launch(ctx, e, p.state)
}

// launch creates the sandbox reserve took, and unlocks it; a failed
// create leaves nothing of it.
func (m *Manager) launch(ctx context.Context, e *entry, state *savedState) (Record, error) {
	defer e.mu.Unlock()
	id, slot := e.rec.ID, e.rec.Net.Slot
	start := time.Now()
	rec, err := m.create(ctx, e, state)
	if err != nil {
		err = noSpace(err)
		m.log.Warn("create failed; undone", "sandbox", id, "error", err)
		m.forget(id, slot)
		return Record{}, err
	}
	m.log.Info("sandbox running", "sandbox", rec.ID, "template", rec.Template, "address", rec.Net.SandboxIP, "took", time.Since(start).Round(time.Millisecond))
	return rec, nil
}

func (m *Manager) create(ctx context.Context, e *entry, state *savedState) (Record, error) {
	rec := &e.rec
	var undo []func()
	fail := func(err error) (Record, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		return Record{}, err
	}
	dir := m.sandboxDir(*rec)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fail(fmt.Errorf("sandbox directory: %w", err))
	}
	undo = append(undo, func() { _ = os.RemoveAll(dir) })
	if err := m.save(e); err != nil {
		return fail(err)
	}

	kernelPath, err := kernel.Pick(m.cfg.WrennDir)
	if err != nil {
		return fail(err)
	}
	tpl, err := m.templates.Get(rec.Template)
	if err != nil {
		return fail(err)
	}
	clone, note := m.fromMemory(tpl, rec, kernelPath)
	rec.StartedFrom, rec.BootNote = StartedBoot, note
	if state != nil {
		clone, rec.StartedFrom, rec.BootNote = false, StartedFork, ""
	}
	// A fork's sandboxes tell programs the template their origin came from.
	identity := rec.Template
	if IsForkTemplate(rec.Template) {
		identity = tpl.Parent
	}
	backing := m.templates.RootfsPath(rec.Template)
	if clone {
		backing = m.cloneBacking(tpl)
	}
	diskFile := filepath.Join(dir, "rootfs."+m.cfg.Disks.Name())
	dsk, err := m.cloneDisk(ctx, tpl, backing, diskFile, int64(rec.DiskMiB)<<20)
	if err != nil {
		return fail(err)
	}
	rec.DiskFile, rec.DiskBase = diskFile, backing
	undo = append(undo, func() { _ = m.cfg.Disks.Release(context.Background(), diskFile) })

	if !e.netUp {
		if err := m.cfg.Net.Setup(ctx, rec.Net, rec.Egress); err != nil {
			return fail(err)
		}
	}
	undo = append(undo, func() { _ = m.cfg.Net.Teardown(context.Background(), rec.Net) })

	var boot [24]byte
	if _, err := rand.Read(boot[:]); err != nil {
		return fail(err)
	}
	bootToken := hex.EncodeToString(boot[:])
	rec.Spec = vmm.Spec{
		ID: rec.ID, Kernel: kernelPath, Disk: dsk.Path, DiskFormat: dsk.Format,
		VCPUs: rec.VCPUs, MemoryMiB: rec.MemoryMiB,
		// envd gets a token as a boot input, so it never answers without
		// one; the first /init replaces it with the sandbox's own, so the
		// boot token (readable in the guest's /proc/cmdline) dies at once.
		KernelArgs: append(rec.Net.KernelArgs(m.cfg.DNS), "wrenn.hostname="+rec.ID, "wrenn.envd_token="+bootToken),
		TapDevice:  rec.Net.Tap, MAC: rec.Net.MAC, NetNS: rec.Net.NetNS,
		RunDir: filepath.Join(dir, "run"),
	}
	greet := guestGreeting{token: bootToken, first: true, template: identity}
	if clone {
		// The guest wakes with the template VM's network card and envd token.
		rec.Spec.MAC, rec.StartedFrom, greet.clone = tpl.Memory.MAC, StartedMemory, true
		if IsForkTemplate(rec.Template) {
			rec.StartedFrom = StartedFork
		}
		if greet.token, err = m.templateToken(rec.Template); err != nil {
			return fail(err)
		}
	}
	if state != nil {
		// The saved guest has its source's network card and envd token.
		rec.Spec.MAC, greet.token, greet.clone = state.mac, state.token, true
	}
	rec.State = Starting
	undo = append(undo, func() { m.releaseCgroup(rec.Spec.ID) })
	var inst vmm.Instance
	switch {
	case clone:
		cloner, _ := m.cloner() // fromMemory checked it
		inst, err = cloner.Clone(ctx, rec.Spec, m.templates.MemoryDir(rec.Template))
	case state != nil:
		inst, err = m.cfg.Driver.Restore(ctx, rec.Spec, state.dir)
	default:
		inst, err = m.cfg.Driver.Boot(ctx, rec.Spec)
	}
	if err != nil {
		return fail(fmt.Errorf("%w; console: %s", err, vmm.LogTail(vmm.LogPath(rec.Spec.RunDir), 20)))
	}
	undo = append(undo, func() { _ = m.cfg.Driver.Stop(context.Background(), rec.Spec, inst) })
	rec.VMM = inst
	if err := m.save(e); err != nil {
		return fail(err)
	}

	if err := m.initGuest(ctx, rec, greet); err != nil {
		return fail(fmt.Errorf("%w; console: %s", err, vmm.LogTail(vmm.LogPath(rec.Spec.RunDir), 20)))
	}
	rec.State = Running
	rec.ExpiresAt = time.Now().UTC().Add(rec.Timeout)
	if err := m.save(e); err != nil {
		return fail(err)
	}
	return *rec, nil
}

// guestGreeting is what initGuest tells envd. A booted envd answers to the
// boot token until the first /init gives it the sandbox's own (images
// older than boot tokens accept anything until then); a clone's answers to
// the template VM's; a resumed one knows the sandbox's already.
type guestGreeting struct {
	token string // what envd answers to now; "" means the sandbox's own
	first bool   // a new sandbox: send its token and environment
	clone bool   // woken from a template's memory: its host name and fresh randomness too
	// template is the one programs are told they run from (a fork's names
	// its origin's); "" means the sandbox's own.
	template string
}

// initGuest waits for envd and sends it the clock and, for a new sandbox,
// its token and environment.
func (m *Manager) initGuest(ctx context.Context, rec *Record, g guestGreeting) error {
	waitCtx, cancel := context.WithTimeout(ctx, m.cfg.BootTimeout)
	defer cancel()
	token := g.token
	if token == "" {
		token = rec.EnvdToken
	}
	c := envdclient.New(rec.Net.SandboxIP.String(), token)
	defer c.Close()
	var in envdclient.InitRequest
	if g.first {
		tpl := g.template
		if tpl == "" {
			tpl = rec.Template
		}
		in.AccessToken, in.EnvVars = rec.EnvdToken, withIdentity(rec.EnvVars, rec.ID, tpl)
	}
	if g.clone {
		seed, err := newEntropy()
		if err != nil {
			return err
		}
		in.Hostname, in.Entropy = rec.ID, seed
	}
	return c.InitWhenUp(waitCtx, in)
}

// withIdentity adds the variables that tell programs in the guest which
// sandbox they run in, under Wrenn's names and E2B's; they win over the
// caller's own of the same name.
func withIdentity(env map[string]string, id, template string) map[string]string {
	out := make(map[string]string, len(env)+7)
	for k, v := range env {
		out[k] = v
	}
	out["WRENN_SANDBOX"], out["WRENN_SANDBOX_ID"], out["WRENN_TEMPLATE_ID"], out["WRENN_TEMPLATE"] = "true", id, template, template
	out["E2B_SANDBOX"], out["E2B_SANDBOX_ID"], out["E2B_TEMPLATE_ID"] = "true", id, template
	return out
}

// reattachDisk makes a paused sandbox's disk whole again where the disk
// driver keeps part of it outside its file (device-mapper devices, which
// a host reboot removes), before its VM opens it.
func (m *Manager) reattachDisk(ctx context.Context, rec Record) error {
	r, ok := m.cfg.Disks.(disk.Reattacher)
	if !ok || rec.DiskBase == "" {
		return nil
	}
	if _, err := r.Reattach(ctx, rec.DiskBase, rec.DiskFile, int64(rec.DiskMiB)<<20); err != nil {
		return fmt.Errorf("its disk: %w", err)
	}
	return nil
}

// lock finds a sandbox and locks it for one operation, waiting for the
// one under way at most until ctx ends.
func (m *Manager) lock(ctx context.Context, id string) (*entry, error) {
	m.mu.Lock()
	e, ok := m.sandboxes[id]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err := e.mu.LockContext(ctx); err != nil {
		return nil, err
	}
	// It may have been destroyed while we waited.
	if !m.current(id, e) {
		e.mu.Unlock()
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return e, nil
}

// current reports whether e is still the sandbox id.
func (m *Manager) current(id string, e *entry) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sandboxes[id] == e
}

// tryLock is lock for the reaper's watchers: it returns nil at once when
// the sandbox is gone or busy with an operation, so one slow pause cannot
// hold up every other sandbox's checks.
func (m *Manager) tryLock(id string) *entry {
	m.mu.Lock()
	e, ok := m.sandboxes[id]
	m.mu.Unlock()
	if !ok || !e.mu.TryLock() {
		return nil
	}
	if !m.current(id, e) {
		e.mu.Unlock()
		return nil
	}
	return e
}

// Destroy stops a sandbox and removes everything it had. Destroying a
// sandbox that does not exist succeeds.
func (m *Manager) Destroy(ctx context.Context, id string) error {
	e, err := m.lock(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer e.mu.Unlock()
	if err := m.teardown(ctx, e.rec); err != nil {
		return err
	}
	m.forget(id, e.rec.Net.Slot)
	m.log.Info("sandbox destroyed", "sandbox", id)
	m.dropForkTemplate(e.rec.Template)
	return nil
}

// teardown removes a sandbox's VMM, network, disk and snapshot.
func (m *Manager) teardown(ctx context.Context, rec Record) error {
	if rec.Spec.RunDir != "" {
		if err := m.cfg.Driver.Stop(ctx, rec.Spec, rec.VMM); err != nil {
			return fmt.Errorf("destroy %s: %w", rec.ID, err)
		}
	}
	m.releaseCgroup(rec.Spec.ID)
	if err := m.cfg.Net.Teardown(ctx, rec.Net); err != nil {
		return fmt.Errorf("destroy %s: %w", rec.ID, err)
	}
	if rec.DiskFile != "" {
		if err := m.cfg.Disks.Release(ctx, rec.DiskFile); err != nil {
			return fmt.Errorf("destroy %s: %w", rec.ID, err)
		}
	}
	for _, dir := range []string{m.snapshotDir(rec), m.sandboxDir(rec)} {
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("destroy %s: %w", rec.ID, err)
		}
	}
	return nil
}

// Pause saves a running sandbox's memory and stops its VMM. The network
// stays, so the sandbox keeps its address.
func (m *Manager) Pause(ctx context.Context, id string) (Record, error) {
	e, err := m.lock(ctx, id)
	if err != nil {
		return Record{}, err
	}
	defer e.mu.Unlock()
	return m.pause(ctx, e)
}

func (m *Manager) pause(ctx context.Context, e *entry) (Record, error) {
	rec := &e.rec
	switch rec.State {
	case Paused:
		return *rec, nil
	case Running:
	default:
		return Record{}, fmt.Errorf("%w: %s is %s", ErrWrongState, rec.ID, rec.State)
	}
	// The memory snapshot is at most the guest's memory.
	if err := m.needSpace("pausing "+rec.ID, rec.MemoryMiB); err != nil {
		return Record{}, err
	}
	defer m.show(e, Pausing)()
	start := time.Now()
	c := m.client(e)
	prepCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := c.PrepareSnapshot(prepCtx); err != nil {
		m.log.Warn("guest did not flush before pause", "sandbox", rec.ID, "error", err)
	}
	cancel()
	if err := m.cfg.Driver.Snapshot(ctx, rec.Spec, rec.VMM, m.snapshotDir(*rec)); err != nil {
		return Record{}, noSpace(fmt.Errorf("pause %s: %w", rec.ID, err))
	}
	if err := os.WriteFile(filepath.Join(m.snapshotDir(*rec), snapshotDone), nil, 0o600); err != nil {
		m.log.Warn("could not mark the snapshot complete", "sandbox", rec.ID, "error", err)
	}
	c.Close() // connections into the stopped VM are dead; dial afresh after resume
	m.releaseCgroup(rec.Spec.ID)
	rec.State, rec.VMM = Paused, vmm.Instance{}
	if err := m.save(e); err != nil {
		// The snapshot is complete and the VMM gone: the sandbox is paused
		// whatever the record says, and a restarted agent sees it so (see
		// reconcile), so the pause stands.
		m.log.Error("sandbox paused but its record could not be saved", "sandbox", rec.ID, "error", err)
	}
	m.log.Info("sandbox paused", "sandbox", rec.ID, "took", time.Since(start).Round(time.Millisecond))
	return *rec, nil
}

// Resume restores a paused sandbox. On failure it stays paused, with its
// snapshot, so nothing is lost.
func (m *Manager) Resume(ctx context.Context, id string, timeout time.Duration) (Record, error) {
	if timeout < 0 || timeout > MaxTimeout {
		return Record{}, fmt.Errorf("%w: timeout must be between 0 and %v", ErrInvalid, MaxTimeout)
	}
	e, err := m.lock(ctx, id)
	if err != nil {
		return Record{}, err
	}
	defer e.mu.Unlock()
	rec := &e.rec
	switch rec.State {
	case Running:
		return *rec, nil
	case Paused:
	default:
		return Record{}, fmt.Errorf("%w: %s is %s", ErrWrongState, rec.ID, rec.State)
	}
	if err := m.needSpace("resuming "+rec.ID, 0); err != nil {
		return Record{}, err
	}
	defer m.show(e, Resuming)()
	start := time.Now()
	if !m.cfg.Net.Exists(rec.Net) {
		// The host rebooted since the pause; the slot is still ours.
		if err := m.cfg.Net.Setup(ctx, rec.Net, rec.Egress); err != nil {
			return Record{}, fmt.Errorf("resume %s: %w", rec.ID, err)
		}
	}
	if err := m.reattachDisk(ctx, *rec); err != nil {
		return Record{}, fmt.Errorf("resume %s: %w", rec.ID, err)
	}
	inst, err := m.cfg.Driver.Restore(ctx, rec.Spec, m.snapshotDir(*rec))
	if err != nil {
		m.releaseCgroup(rec.Spec.ID)
		return Record{}, fmt.Errorf("resume %s: %w", rec.ID, err)
	}
	rec.VMM = inst
	if err := m.initGuest(ctx, rec, guestGreeting{}); err != nil {
		m.discardVMM(rec.Spec, inst)
		rec.VMM = vmm.Instance{}
		return Record{}, fmt.Errorf("resume %s: %w", rec.ID, err)
	}
	paused := *rec
	if timeout > 0 {
		rec.Timeout = timeout
	}
	rec.State, rec.ExpiresAt = Running, time.Now().UTC().Add(rec.Timeout)
	if err := m.save(e); err != nil {
		// Still paused on disk: stay paused, so the snapshot stays the truth.
		m.discardVMM(rec.Spec, inst)
		*rec = paused
		rec.VMM = vmm.Instance{}
		return Record{}, noSpace(fmt.Errorf("resume %s: %w", rec.ID, err))
	}
	// The memory now lives in the VM again; the snapshot is stale.
	_ = os.RemoveAll(m.snapshotDir(*rec))
	m.log.Info("sandbox resumed", "sandbox", rec.ID, "took", time.Since(start).Round(time.Millisecond))
	return *rec, nil
}

// Ping moves a running sandbox's deadline; a timeout of 0 keeps its own.
func (m *Manager) Ping(ctx context.Context, id string, timeout time.Duration) (Record, error) {
	if timeout < 0 || timeout > MaxTimeout {
		return Record{}, fmt.Errorf("%w: timeout must be between 0 and %v", ErrInvalid, MaxTimeout)
	}
	e, err := m.lock(ctx, id)
	if err != nil {
		return Record{}, err
	}
	defer e.mu.Unlock()
	if timeout > 0 {
		e.rec.Timeout = timeout
	}
	e.rec.ExpiresAt = time.Now().UTC().Add(e.rec.Timeout)
	if err := m.save(e); err != nil {
		return Record{}, err
	}
	return e.rec, nil
}

// Get returns one sandbox as last saved: it never waits behind an
// operation (a create, a pause) under way on it.
func (m *Manager) Get(id string) (Record, error) {
	return m.Peek(id)
}

// Peek returns a sandbox as last saved, without waiting behind an
// operation on it (the proxy reads it on every request).
func (m *Manager) Peek(id string) (Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.sandboxes[id]
	if !ok {
		return Record{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return e.view, nil
}

// List returns every sandbox, by id, without waiting for busy ones: a
// sandbox being created shows as pending or starting.
func (m *Manager) List() []Record {
	m.mu.Lock()
	out := make([]Record, 0, len(m.sandboxes))
	for _, e := range m.sandboxes {
		if e.view.Pool == "" && !e.view.Internal { // warm-pool members are not sandboxes yet
			out = append(out, e.view)
		}
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Envd returns a client for a running sandbox's envd.
func (m *Manager) Envd(id string) (*envdclient.Client, error) {
	rec, err := m.Get(id)
	if err != nil {
		return nil, err
	}
	if rec.State != Running {
		return nil, fmt.Errorf("%w: %s is %s, not running", ErrWrongState, id, rec.State)
	}
	m.mu.Lock()
	e := m.sandboxes[id]
	m.mu.Unlock()
	if e == nil {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return m.client(e), nil
}

// client returns the sandbox's envd client, one per sandbox so that calls
// reuse connections instead of dialling the guest each time.
func (m *Manager) client(e *entry) *envdclient.Client {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e.envd == nil {
		e.envd = envdclient.New(e.view.Net.SandboxIP.String(), e.view.EnvdToken)
	}
	return e.envd
}

// SaveAsTemplate copies a sandbox's disk (and with memory, its memory) into a new template that new
// sandboxes can start from. A running sandbox is frozen (its disk flushed)
// for the copy and then continues.
func (m *Manager) SaveAsTemplate(ctx context.Context, id, name, source string, memory bool) (template.Metadata, error) {
	if err := template.ValidateName(name); err != nil {
		return template.Metadata{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if _, err := m.templates.Get(name); err == nil {
		return template.Metadata{}, fmt.Errorf("%w: template %q already exists", ErrExists, name)
	}
	e, err := m.lock(ctx, id)
	if err != nil {
		return template.Metadata{}, err
	}
	defer e.mu.Unlock()
	rec := e.rec
	// The copy holds the disk's data; its size is not known before, so the
	// reserve is what is checked, and a full disk midway is reported as such.
	if err := m.needSpace("saving template "+name, 0); err != nil {
		return template.Metadata{}, err
	}
	start := time.Now()
	tmp := filepath.Join(m.sandboxDir(rec), "template.raw")
	defer os.Remove(tmp)
	// The memory goes with the disk when the VMM can start sandboxes from it:
	// a running sandbox's is saved in the same frozen moment as the disk
	// copy; a paused one's is its pause snapshot.
	_, cloneErr := m.cloner()
	withMemory := memory && cloneErr == nil
	memFrom := ""
	switch rec.State {
	case Running:
		if withMemory {
			if err := m.needSpace("the memory of template "+name, rec.MemoryMiB); err != nil {
				return template.Metadata{}, err
			}
			memFrom = filepath.Join(m.sandboxDir(rec), "template-memory")
			defer os.RemoveAll(memFrom)
		}
		if err := m.copyFrozen(ctx, e, flattenTo(rec, tmp), memFrom); err != nil {
			return template.Metadata{}, noSpace(err)
		}
	case Paused:
		if err := template.Flatten(ctx, rec.Spec.Disk, rec.Spec.DiskFormat, tmp); err != nil {
			return template.Metadata{}, noSpace(err)
		}
		if withMemory && m.hasSnapshot(rec) {
			memFrom = m.snapshotDir(rec)
		}
	default:
		return template.Metadata{}, fmt.Errorf("%w: %s is %s", ErrWrongState, id, rec.State)
	}
	parent, _ := m.templates.Get(rec.Template)
	meta, err := m.templates.Adopt(ctx, name, tmp, template.Metadata{Source: source + ":" + id, Parent: rec.Template, EnvdVersion: parent.EnvdVersion})
	if err != nil {
		return template.Metadata{}, noSpace(err)
	}
	if memFrom != "" {
		mem, err := m.saveMemoryTemplate(ctx, name, rec, memFrom, "")
		if err != nil {
			// Nothing half made: the template goes with its memory or not at all.
			_ = m.templates.Delete(name)
			return template.Metadata{}, fmt.Errorf("save the memory of template %s: %w", name, err)
		}
		meta.Memory = mem
	}
	m.log.Info("template saved from sandbox", "template", name, "sandbox", id, "took", time.Since(start).Round(time.Millisecond))
	return meta, nil
}

// DeleteTemplate removes a template no sandbox on this host depends on
// (their disks are overlays of it).
func (m *Manager) DeleteTemplate(name string) error {
	if err := template.ValidateName(name); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	// Its warm pool goes first; none refills while it is deleted.
	m.pools.fill.Lock()
	defer m.pools.fill.Unlock()
	if err := m.drainPool(context.Background(), name); err != nil {
		return fmt.Errorf("drain template %q's warm pool: %w", name, err)
	}
	var users []string
	layers := map[string]bool{} // forks' templates whose disks are layers on this one
	for _, r := range m.List() {
		if IsForkTemplate(r.Template) && !layers[r.Template] {
			if t, err := m.templates.Get(r.Template); err == nil && t.Layer && t.Parent == name {
				layers[r.Template] = true
			}
		}
		if r.Template == name || layers[r.Template] {
			users = append(users, r.ID)
		}
	}
	if len(users) > 0 {
		return fmt.Errorf("%w: template %q is in use by %d sandbox(es): %v", ErrWrongState, name, len(users), users)
	}
	if err := m.templates.Delete(name); err != nil {
		if errors.Is(err, template.ErrNotFound) {
			return fmt.Errorf("%w: template %q", ErrNotFound, name)
		}
		return err
	}
	m.log.Info("template deleted", "template", name)
	return nil
}
