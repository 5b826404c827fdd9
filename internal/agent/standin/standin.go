// Package standin is a host for in-process tests of the sandbox manager
// and the agent's RPC server: sandbox networks that are loopback
// addresses, and a VMM driver whose "guest" is a real envd served in the
// test's own process on that address. It needs no root, namespaces, VMM
// or kernel, so the manager's own logic (what a failed create undoes,
// what is saved, locks, what a restart finds) runs in milliseconds and
// under the race detector. What it cannot stand in for (QEMU, Firecracker,
// netlink, nftables) has its own tests with real VMs.
package standin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/egress"
	envd "github.com/wrenn/wrenn/internal/envd/server"
	"github.com/wrenn/wrenn/internal/guest/template"
)

// Network gives slot n the sandbox address Base+n (on loopback, where
// every 127/8 address is the host's own) and keeps which slots are "up".
// It satisfies sandbox.Network.
type Network struct {
	// Base is the address before slot 1's, e.g. 127.90.0.0. Test
	// packages running at once use different ones.
	Base netip.Addr
	// SetupErr, when set, is asked before each Setup; an error fails it.
	SetupErr func(a network.Allocation) error

	mu sync.Mutex
	up map[string]network.Allocation // by namespace name
}

// Allocation is the real slot's allocation with a loopback sandbox address
// and a namespace name of the stand-in's own.
func (n *Network) Allocation(slot int) (network.Allocation, error) {
	a, err := network.ForSlot(slot)
	if err != nil {
		return a, err
	}
	if slot > 65000 {
		return a, fmt.Errorf("stand-in network: slot %d does not fit its loopback range", slot)
	}
	b := n.Base.As4()
	v := uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) + uint32(slot)
	a.SandboxIP = netip.AddrFrom4([4]byte{b[0], byte(v >> 16), byte(v >> 8), byte(v)})
	a.NetNS = fmt.Sprintf("standin-%d", slot)
	return a, nil
}

// PrepareHost has nothing to prepare.
func (n *Network) PrepareHost(context.Context) error { return nil }

// Setup marks the slot's network as made.
func (n *Network) Setup(_ context.Context, a network.Allocation, p egress.Policy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if n.SetupErr != nil {
		if err := n.SetupErr(a); err != nil {
			return err
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.up == nil {
		n.up = map[string]network.Allocation{}
	}
	if _, ok := n.up[a.NetNS]; ok {
		return fmt.Errorf("network namespace %s exists already", a.NetNS)
	}
	n.up[a.NetNS] = a
	return nil
}

// Teardown forgets the slot's network; one that is gone is no error.
func (n *Network) Teardown(_ context.Context, a network.Allocation) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.up, a.NetNS)
	return nil
}

// Exists reports whether the slot's network is made.
func (n *Network) Exists(a network.Allocation) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.up[a.NetNS]
	return ok
}

// Slots lists the slots whose networks are made.
func (n *Network) Slots() ([]int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var slots []int
	for _, a := range n.up {
		slots = append(slots, a.Slot)
	}
	return slots, nil
}

// ScratchTap has nothing to add.
func (n *Network) ScratchTap(context.Context, network.Allocation, string) (func(), error) {
	return func() {}, nil
}

// address is where the VM of a namespace serves envd.
func (n *Network) address(netns string) (netip.Addr, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a, ok := n.up[netns]
	if !ok {
		return netip.Addr{}, fmt.Errorf("network namespace %s does not exist", netns)
	}
	return a.SandboxIP, nil
}

// Reboot forgets every network, as a host reboot removes namespaces.
func (n *Network) Reboot() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.up = nil
}

// Driver is a VMM driver whose VM is an envd in this process, listening
// on the sandbox's address. It keeps what a VM has (envd's processes,
// environment and token) across a snapshot and restore, as a VM's memory
// would: a "snapshot" keeps the envd, stopped from serving, in memory.
type Driver struct {
	Net *Network
	Log *slog.Logger
	// BeforeBoot and BeforeRestore, when set, run first; an error fails
	// the call (a VMM that would not start), and they may block to hold
	// an operation open.
	BeforeBoot    func(ctx context.Context, spec vmm.Spec) error
	BeforeRestore func(ctx context.Context, spec vmm.Spec) error

	mu    sync.Mutex
	next  uint64
	vms   map[string]*vm   // running, by sandbox id
	saved map[string]*save // snapshots, by sandbox id
}

type vm struct {
	inst   vmm.Instance
	envd   *envd.Server
	http   *http.Server
	frozen *gate
}

type save struct {
	dir  string
	envd *envd.Server
}

// gate holds requests while a VM is frozen, as a stopped vCPU would.
type gate struct {
	mu     sync.Mutex
	closed chan struct{} // nil while open
}

func (g *gate) freeze() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed == nil {
		g.closed = make(chan struct{})
	}
}

func (g *gate) thaw() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed != nil {
		close(g.closed)
		g.closed = nil
	}
}

func (g *gate) wait(ctx context.Context) {
	g.mu.Lock()
	c := g.closed
	g.mu.Unlock()
	if c != nil {
		select {
		case <-c:
		case <-ctx.Done():
		}
	}
}

// Name is the stand-in's.
func (d *Driver) Name() string { return "standin" }

// Boot starts an envd that answers to the boot token in the kernel
// arguments, as the guest's does.
func (d *Driver) Boot(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	if d.BeforeBoot != nil {
		if err := d.BeforeBoot(ctx, spec); err != nil {
			return vmm.Instance{}, err
		}
	}
	token := ""
	for _, a := range spec.KernelArgs {
		if v, ok := strings.CutPrefix(a, "wrenn.envd_token="); ok {
			token = v
		}
	}
	if token == "" {
		return vmm.Instance{}, errors.New("stand-in VM: no wrenn.envd_token in the kernel arguments")
	}
	if _, err := os.Stat(spec.Disk); err != nil {
		return vmm.Instance{}, fmt.Errorf("stand-in VM: its disk: %w", err)
	}
	me, err := user.Current()
	if err != nil {
		return vmm.Instance{}, err
	}
	srv := envd.New(envd.Config{Log: d.log(), FallbackUser: me.Username, AccessToken: token, Port: envdclient.Port})
	return d.serve(spec, srv)
}

// Snapshot stops serving and keeps the envd as the VM's memory.
func (d *Driver) Snapshot(_ context.Context, spec vmm.Spec, inst vmm.Instance, dir string) error {
	d.mu.Lock()
	v, ok := d.vms[spec.ID]
	d.mu.Unlock()
	if !ok || v.inst != inst {
		return fmt.Errorf("stand-in VM %s is not running", spec.ID)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "memory"), []byte(spec.ID), 0o600); err != nil {
		return err
	}
	_ = v.http.Close()
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.vms, spec.ID)
	if d.saved == nil {
		d.saved = map[string]*save{}
	}
	d.saved[spec.ID] = &save{dir: dir, envd: v.envd}
	return nil
}

// Restore serves the kept envd again. Like a real restore it needs the
// snapshot's files; unlike one, its memory does not outlive the process.
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, dir string) (vmm.Instance, error) {
	if d.BeforeRestore != nil {
		if err := d.BeforeRestore(ctx, spec); err != nil {
			return vmm.Instance{}, err
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "memory")); err != nil {
		return vmm.Instance{}, fmt.Errorf("stand-in VM: snapshot: %w", err)
	}
	d.mu.Lock()
	s, ok := d.saved[spec.ID]
	d.mu.Unlock()
	if !ok || s.dir != dir {
		return vmm.Instance{}, fmt.Errorf("stand-in VM %s: no memory kept for %s", spec.ID, dir)
	}
	inst, err := d.serve(spec, s.envd)
	if err != nil {
		return inst, err
	}
	d.mu.Lock()
	delete(d.saved, spec.ID)
	d.mu.Unlock()
	return inst, nil
}

// serve makes srv the VM spec.ID, on its network's sandbox address.
func (d *Driver) serve(spec vmm.Spec, srv *envd.Server) (vmm.Instance, error) {
	ip, err := d.Net.address(spec.NetNS)
	if err != nil {
		return vmm.Instance{}, fmt.Errorf("stand-in VM: %w", err)
	}
	if err := os.MkdirAll(spec.RunDir, 0o700); err != nil {
		return vmm.Instance{}, err
	}
	d.mu.Lock()
	if _, ok := d.vms[spec.ID]; ok {
		d.mu.Unlock()
		return vmm.Instance{}, fmt.Errorf("stand-in VM %s is running already", spec.ID)
	}
	d.next++
	inst := vmm.Instance{PID: os.Getpid(), Start: d.next}
	d.mu.Unlock()

	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, envdclient.Port).String())
	if err != nil {
		return vmm.Instance{}, fmt.Errorf("stand-in VM: %w", err)
	}
	v := &vm{inst: inst, envd: srv, frozen: &gate{}}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	v.http = &http.Server{
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			v.frozen.wait(r.Context())
			srv.Handler().ServeHTTP(w, r)
		}),
	}
	go func() { _ = v.http.Serve(ln) }()
	line := fmt.Sprintf("stand-in VM %s: envd serving on %s\n", spec.ID, ln.Addr())
	_ = os.WriteFile(vmm.LogPath(spec.RunDir), []byte(line), 0o600)

	d.mu.Lock()
	defer d.mu.Unlock()
	if d.vms == nil {
		d.vms = map[string]*vm{}
	}
	d.vms[spec.ID] = v
	return inst, nil
}

// Stop ends the VM and drops any memory kept for it.
func (d *Driver) Stop(_ context.Context, spec vmm.Spec, _ vmm.Instance) error {
	d.mu.Lock()
	v := d.vms[spec.ID]
	s := d.saved[spec.ID]
	delete(d.vms, spec.ID)
	delete(d.saved, spec.ID)
	d.mu.Unlock()
	if v != nil {
		v.frozen.thaw()
		_ = v.http.Close()
		v.envd.Shutdown()
	}
	if s != nil {
		s.envd.Shutdown()
	}
	return nil
}

// Crash ends a VM as a VMM's crash would, behind the manager's back.
func (d *Driver) Crash(id string) {
	_ = d.Stop(context.Background(), vmm.Spec{ID: id}, vmm.Instance{})
}

// Alive reports whether inst is the VM's current "VMM".
func (d *Driver) Alive(spec vmm.Spec, inst vmm.Instance) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[spec.ID]
	return ok && v.inst == inst
}

// Running lists the running VMs' ids.
func (d *Driver) Running() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ids []string
	for id := range d.vms {
		ids = append(ids, id)
	}
	return ids
}

// Freeze holds every request to the VM's envd until Thaw.
func (d *Driver) Freeze(_ context.Context, spec vmm.Spec, _ vmm.Instance) error {
	return d.withVM(spec.ID, func(v *vm) { v.frozen.freeze() })
}

// Thaw lets held requests through.
func (d *Driver) Thaw(_ context.Context, spec vmm.Spec, _ vmm.Instance) error {
	return d.withVM(spec.ID, func(v *vm) { v.frozen.thaw() })
}

// Stalled is never true: the stand-in writes nothing while running.
func (d *Driver) Stalled(context.Context, vmm.Spec, vmm.Instance) (bool, error) {
	return false, nil
}

func (d *Driver) withVM(id string, fn func(*vm)) error {
	d.mu.Lock()
	v, ok := d.vms[id]
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("stand-in VM %s is not running", id)
	}
	fn(v)
	return nil
}

// Close ends every VM and kept memory (a test's cleanup).
func (d *Driver) Close() {
	d.mu.Lock()
	ids := map[string]bool{}
	for id := range d.vms {
		ids[id] = true
	}
	for id := range d.saved {
		ids[id] = true
	}
	d.mu.Unlock()
	for id := range ids {
		d.Crash(id)
	}
}

func (d *Driver) log() *slog.Logger {
	if d.Log != nil {
		return d.Log
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// PrepareDir gives a WRENN_DIR what a create reads: a kernel file (never
// run) and a template of the given name with an image of sizeMiB.
func PrepareDir(ctx context.Context, wrennDir, tpl string, sizeMiB int64) error {
	kernels := filepath.Join(wrennDir, "kernels")
	if err := os.MkdirAll(kernels, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(kernels, "vmlinux-6.1.0"), []byte("stand-in kernel"), 0o644); err != nil {
		return err
	}
	img := filepath.Join(wrennDir, "image.tmp")
	if err := os.WriteFile(img, []byte("stand-in root file system"), 0o644); err != nil {
		return err
	}
	if err := os.Truncate(img, sizeMiB<<20); err != nil {
		return err
	}
	store := template.Store{Dir: filepath.Join(wrennDir, "images")}
	_, err := store.Adopt(ctx, tpl, img, template.Metadata{Source: "standin"})
	return err
}
