package sandbox_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/agent/standin"
	"github.com/wrenn/wrenn/internal/agent/vmm"
)

// These tests run the manager in this process on the stand-in host:
// loopback networks and "VMs" that are envds of this process. What they
// check is the manager's own bookkeeping; the same operations with real
// VMs, namespaces and firewalls are in package agenttest.

const tpl = "tiny"

// host is one agent's manager on a stand-in host; restart gives the same
// directory, networks and VMs to a new manager, as an agent restart does.
type host struct {
	t      *testing.T
	dir    string
	net    *standin.Network
	drv    *standin.Driver
	m      *sandbox.Manager
	cfg    sandbox.Config
	cancel context.CancelFunc
}

func newHost(t *testing.T, tweak func(*sandbox.Config)) *host {
	t.Helper()
	dir := t.TempDir()
	if err := standin.PrepareDir(context.Background(), dir, tpl, 8); err != nil {
		t.Fatal(err)
	}
	n := &standin.Network{Base: netip.MustParseAddr("127.90.0.0")}
	d := &standin.Driver{Net: n}
	t.Cleanup(d.Close)
	cfg := sandbox.Config{
		WrennDir: dir, Driver: d, Disks: disk.SparseCopy{}, Net: n, Log: testLog(),
		HostMemoryMiB: 4096, MinFreeMiB: 1, Slots: network.SlotRange{First: 1, Last: 16},
		BootTimeout: 10 * time.Second, ReapInterval: time.Hour,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	h := &host{t: t, dir: dir, net: n, drv: d, cfg: cfg}
	h.start()
	return h
}

func (h *host) start() {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h.m, h.cancel = sandbox.New(h.cfg), cancel
	if err := h.m.Start(ctx); err != nil {
		cancel()
		h.t.Fatal(err)
	}
	h.t.Cleanup(cancel)
}

// restart ends this manager and starts another on what it left.
func (h *host) restart() {
	h.cancel()
	h.start()
}

func testLog() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func (h *host) create(id string, tweak func(*sandbox.CreateParams)) sandbox.Record {
	h.t.Helper()
	p := sandbox.CreateParams{ID: id, Template: tpl, VCPUs: 1, MemoryMiB: 256, Timeout: time.Hour}
	if tweak != nil {
		tweak(&p)
	}
	rec, err := h.m.Create(context.Background(), p)
	if err != nil {
		h.t.Fatalf("create %s: %v", id, err)
	}
	return rec
}

// run runs a shell command in the sandbox as the caller and returns its
// standard output.
func run(t *testing.T, c *envdclient.Client, script string) string {
	t.Helper()
	var out bytes.Buffer
	code := int32(-1)
	err := c.Exec(context.Background(), envdclient.ExecSpec{Cmd: "/bin/sh", Args: []string{"-c", script}}, func(ev envdclient.ExecEvent) error {
		out.Write(ev.Stdout)
		if ev.ExitCode != nil {
			code = *ev.ExitCode
		}
		return nil
	})
	if err != nil || code != 0 {
		t.Fatalf("%q: exit %d, %v; output %q", script, code, err, out.String())
	}
	return out.String()
}

func (h *host) envd(id string) *envdclient.Client {
	h.t.Helper()
	c, err := h.m.Envd(id)
	if err != nil {
		h.t.Fatal(err)
	}
	return c
}

// ids lists what the manager lists.
func ids(m *sandbox.Manager) []string {
	var out []string
	for _, r := range m.List() {
		out = append(out, r.ID+":"+string(r.State))
	}
	return out
}

func bootToken(rec sandbox.Record) string {
	for _, a := range rec.Spec.KernelArgs {
		if v, ok := strings.CutPrefix(a, "wrenn.envd_token="); ok {
			return v
		}
	}
	return ""
}

func TestCreateGivesARunningSandboxWithItsOwnToken(t *testing.T) {
	h := newHost(t, nil)
	rec := h.create("sb-one", func(p *sandbox.CreateParams) { p.EnvVars = map[string]string{"GREETING": "hello"} })
	if rec.State != sandbox.Running || rec.Net.Slot != 1 || !rec.Net.SandboxIP.IsLoopback() {
		t.Fatalf("record: state %s, slot %d, address %s", rec.State, rec.Net.Slot, rec.Net.SandboxIP)
	}
	if rec.ExpiresAt.Before(time.Now().Add(59 * time.Minute)) {
		t.Errorf("expires at %v, want an hour from now", rec.ExpiresAt)
	}
	if _, err := os.Stat(rec.DiskFile); err != nil {
		t.Errorf("its disk: %v", err)
	}
	got := run(t, h.envd(rec.ID), `echo "$GREETING $WRENN_SANDBOX_ID $E2B_TEMPLATE_ID"`)
	if want := "hello sb-one " + tpl + "\n"; got != want {
		t.Errorf("environment in the sandbox: %q, want %q", got, want)
	}
	// The boot token (in the VM's kernel command line) died at /init.
	boot := bootToken(rec)
	if boot == "" || boot == rec.EnvdToken {
		t.Fatalf("boot token %q, sandbox token %q", boot, rec.EnvdToken)
	}
	old := envdclient.New(rec.Net.SandboxIP.String(), boot)
	defer old.Close()
	if _, err := old.List(context.Background()); err == nil {
		t.Error("envd still answers to the boot token after /init")
	}
	// The record on disk is the agent's alone: it holds the token.
	for _, p := range []string{filepath.Join(h.dir, "sandboxes"), filepath.Join(h.dir, "sandboxes", rec.ID, "sandbox.json")} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s: %v, mode %v", p, err, fi.Mode())
		}
	}
	if got, err := h.m.Get(rec.ID); err != nil || got.State != sandbox.Running {
		t.Errorf("Get: %+v, %v", got.State, err)
	}
}

func TestBadRequestsAreRefusedBeforeAnythingIsMade(t *testing.T) {
	h := newHost(t, nil)
	for name, tc := range map[string]struct {
		p    sandbox.CreateParams
		want error
	}{
		"bad id":          {sandbox.CreateParams{ID: "Bad_ID", Template: tpl, VCPUs: 1, MemoryMiB: 256}, sandbox.ErrInvalid},
		"unknown":         {sandbox.CreateParams{Template: "nope", VCPUs: 1, MemoryMiB: 256}, sandbox.ErrTemplateUnkwn},
		"no vcpus":        {sandbox.CreateParams{Template: tpl, MemoryMiB: 256}, sandbox.ErrInvalid},
		"little memory":   {sandbox.CreateParams{Template: tpl, VCPUs: 1, MemoryMiB: 64}, sandbox.ErrInvalid},
		"disk too small":  {sandbox.CreateParams{Template: tpl, VCPUs: 1, MemoryMiB: 256, DiskMiB: 4}, sandbox.ErrInvalid},
		"bad environment": {sandbox.CreateParams{Template: tpl, VCPUs: 1, MemoryMiB: 256, EnvVars: map[string]string{"A=B": "c"}}, sandbox.ErrInvalid},
		"more than host":  {sandbox.CreateParams{Template: tpl, VCPUs: 1, MemoryMiB: 8192}, sandbox.ErrInvalid},
	} {
		if _, err := h.m.Create(context.Background(), tc.p); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	if got := ids(h.m); len(got) != 0 {
		t.Errorf("listed after refused creates: %v", got)
	}
	if slots, _ := h.net.Slots(); len(slots) != 0 {
		t.Errorf("networks left: %v", slots)
	}
}

func TestAFailedCreateUndoesWhatItDid(t *testing.T) {
	h := newHost(t, nil)
	fail := errors.New("injected failure")
	steps := map[string]func(){
		"network": func() { h.net.SetupErr = func(network.Allocation) error { return fail } },
		"vmm":     func() { h.drv.BeforeBoot = func(context.Context, vmm.Spec) error { return fail } },
		"disk": func() {
			if err := os.Remove(filepath.Join(h.dir, "images", tpl, "rootfs.ext4")); err != nil {
				t.Fatal(err)
			}
		},
	}
	for _, step := range []string{"network", "vmm", "disk"} {
		h.net.SetupErr, h.drv.BeforeBoot = nil, nil
		steps[step]()
		_, err := h.m.Create(context.Background(), sandbox.CreateParams{ID: "sb-fails", Template: tpl, VCPUs: 1, MemoryMiB: 256})
		if err == nil {
			t.Fatalf("%s failing: create succeeded", step)
		}
		if step != "disk" && !errors.Is(err, fail) {
			t.Errorf("%s failing: %v does not carry the cause", step, err)
		}
		if got := ids(h.m); len(got) != 0 {
			t.Errorf("%s failing: listed %v", step, got)
		}
		if slots, _ := h.net.Slots(); len(slots) != 0 {
			t.Errorf("%s failing: networks left %v", step, slots)
		}
		if vms := h.drv.Running(); len(vms) != 0 {
			t.Errorf("%s failing: VMs left %v", step, vms)
		}
		if left, _ := os.ReadDir(filepath.Join(h.dir, "sandboxes")); len(left) != 0 {
			t.Errorf("%s failing: sandbox directories left: %d", step, len(left))
		}
	}
}

func TestPauseAndResumeKeepTheGuest(t *testing.T) {
	h := newHost(t, nil)
	rec := h.create("sb-pause", func(p *sandbox.CreateParams) { p.EnvVars = map[string]string{"KEPT": "yes"} })
	paused, err := h.m.Pause(context.Background(), rec.ID)
	if err != nil || paused.State != sandbox.Paused {
		t.Fatalf("pause: %s, %v", paused.State, err)
	}
	if h.drv.Alive(rec.Spec, rec.VMM) {
		t.Error("the VMM still runs after the pause")
	}
	if !h.net.Exists(rec.Net) {
		t.Error("the pause gave the network up: the sandbox would lose its address")
	}
	if _, err := h.m.Envd(rec.ID); !errors.Is(err, sandbox.ErrWrongState) {
		t.Errorf("envd of a paused sandbox: %v, want ErrWrongState", err)
	}
	if _, err := os.Stat(filepath.Join(h.dir, "snapshots", rec.ID, "complete")); err != nil {
		t.Errorf("snapshot not marked complete: %v", err)
	}
	again, err := h.m.Pause(context.Background(), rec.ID)
	if err != nil || again.State != sandbox.Paused {
		t.Errorf("pausing a paused sandbox: %s, %v", again.State, err)
	}

	resumed, err := h.m.Resume(context.Background(), rec.ID, 2*time.Hour)
	if err != nil || resumed.State != sandbox.Running {
		t.Fatalf("resume: %s, %v", resumed.State, err)
	}
	if resumed.Timeout != 2*time.Hour || resumed.ExpiresAt.Before(time.Now().Add(119*time.Minute)) {
		t.Errorf("resume's timeout: %v until %v", resumed.Timeout, resumed.ExpiresAt)
	}
	if resumed.Net != rec.Net || resumed.EnvdToken != rec.EnvdToken {
		t.Error("the resumed sandbox has another address or token")
	}
	if got := run(t, h.envd(rec.ID), "echo $KEPT"); got != "yes\n" {
		t.Errorf("the guest's environment after resume: %q", got)
	}
	if _, err := os.Stat(filepath.Join(h.dir, "snapshots", rec.ID)); !os.IsNotExist(err) {
		t.Errorf("the stale snapshot is kept after resume: %v", err)
	}
}

func TestAFailedResumeKeepsTheSandboxPaused(t *testing.T) {
	h := newHost(t, nil)
	rec := h.create("sb-keep", nil)
	if _, err := h.m.Pause(context.Background(), rec.ID); err != nil {
		t.Fatal(err)
	}
	h.drv.BeforeRestore = func(context.Context, vmm.Spec) error { return errors.New("no memory today") }
	if _, err := h.m.Resume(context.Background(), rec.ID, 0); err == nil {
		t.Fatal("resume succeeded with a failing restore")
	}
	if got, _ := h.m.Get(rec.ID); got.State != sandbox.Paused {
		t.Fatalf("after a failed resume: %s", got.State)
	}
	h.drv.BeforeRestore = nil
	if got, err := h.m.Resume(context.Background(), rec.ID, 0); err != nil || got.State != sandbox.Running {
		t.Fatalf("the second resume: %s, %v", got.State, err)
	}
}

func TestResumeAfterAHostRebootMakesTheNetworkAgain(t *testing.T) {
	h := newHost(t, nil)
	rec := h.create("sb-reboot", nil)
	if _, err := h.m.Pause(context.Background(), rec.ID); err != nil {
		t.Fatal(err)
	}
	h.net.Reboot()
	h.restart()
	if got := ids(h.m); len(got) != 1 || got[0] != "sb-reboot:paused" {
		t.Fatalf("after the reboot: %v", got)
	}
	if _, err := h.m.Resume(context.Background(), rec.ID, 0); err != nil {
		t.Fatal(err)
	}
	if !h.net.Exists(rec.Net) {
		t.Error("resume did not make the network again")
	}
	run(t, h.envd(rec.ID), "true")
}

func TestARestartedAgentAdoptsWhatRunsAndCleansUpTheRest(t *testing.T) {
	h := newHost(t, nil)
	running := h.create("sb-running", nil)
	paused := h.create("sb-paused", nil)
	crashed := h.create("sb-crashed", nil)
	if _, err := h.m.Pause(context.Background(), paused.ID); err != nil {
		t.Fatal(err)
	}
	// A network of a slot no sandbox holds (a crash between its setup and
	// the record), and one of another agent's range.
	orphan, _ := h.net.Allocation(9)
	foreign, _ := h.net.Allocation(40)
	for _, a := range []network.Allocation{orphan, foreign} {
		if err := h.net.Setup(context.Background(), a, running.Egress); err != nil {
			t.Fatal(err)
		}
	}
	h.cancel()
	h.drv.Crash(crashed.ID) // the VMM died while no agent ran

	h.start()
	if got := strings.Join(ids(h.m), " "); got != "sb-paused:paused sb-running:running" {
		t.Fatalf("after the restart: %s", got)
	}
	run(t, h.envd(running.ID), "true")
	if h.net.Exists(crashed.Net) || h.net.Exists(orphan) {
		t.Error("networks of the dead sandbox or the orphan slot were kept")
	}
	if !h.net.Exists(foreign) {
		t.Error("another agent's network was removed")
	}
	if _, err := os.Stat(filepath.Join(h.dir, "sandboxes", crashed.ID)); !os.IsNotExist(err) {
		t.Errorf("the dead sandbox's directory: %v", err)
	}
	// Slots in use stay taken: the next create gets the dead one's.
	if next := h.create("sb-next", nil); next.Net.Slot != crashed.Net.Slot {
		t.Errorf("the next create got slot %d, want the freed %d", next.Net.Slot, crashed.Net.Slot)
	}
	if _, err := h.m.Resume(context.Background(), paused.ID, 0); err != nil {
		t.Fatalf("resuming what the earlier agent paused: %v", err)
	}
}

func TestADeadVMMIsReportedWithTheReason(t *testing.T) {
	h := newHost(t, func(c *sandbox.Config) { c.ReapInterval = 20 * time.Millisecond })
	rec := h.create("sb-dies", nil)
	h.drv.Crash(rec.ID)
	got := waitFor(t, h.m, rec.ID, func(r sandbox.Record) bool { return r.State == sandbox.Error })
	if !strings.Contains(got.Error, "exited unexpectedly") || !strings.Contains(got.Error, "disk is kept") {
		t.Errorf("reason: %q", got.Error)
	}
	if _, err := os.Stat(rec.DiskFile); err != nil {
		t.Errorf("the disk of a sandbox in error: %v", err)
	}
	if err := h.m.Destroy(context.Background(), rec.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(rec.DiskFile); !os.IsNotExist(err) {
		t.Errorf("the disk after destroy: %v", err)
	}
}

func waitFor(t *testing.T, m *sandbox.Manager, id string, ok func(sandbox.Record) bool) sandbox.Record {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		rec, err := m.Get(id)
		if err == nil && ok(rec) {
			return rec
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s (%v)", id, rec.State, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDeadlinesPauseOrDestroy(t *testing.T) {
	h := newHost(t, func(c *sandbox.Config) { c.ReapInterval = 20 * time.Millisecond })
	sleeper := h.create("sb-sleeper", func(p *sandbox.CreateParams) { p.Timeout, p.AutoPause = 300*time.Millisecond, true })
	goner := h.create("sb-goner", func(p *sandbox.CreateParams) { p.Timeout = 300 * time.Millisecond })
	kept := h.create("sb-kept", func(p *sandbox.CreateParams) { p.Timeout = 300 * time.Millisecond })
	// A ping moves the deadline: the reaper must look again under the lock.
	if _, err := h.m.Ping(context.Background(), kept.ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	waitFor(t, h.m, sleeper.ID, func(r sandbox.Record) bool { return r.State == sandbox.Paused })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := h.m.Get(goner.ID); errors.Is(err, sandbox.ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the expired sandbox was not destroyed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if h.net.Exists(goner.Net) {
		t.Error("the destroyed sandbox's network is left")
	}
	if got, _ := h.m.Get(kept.ID); got.State != sandbox.Running {
		t.Errorf("the pinged sandbox: %s", got.State)
	}
}

func TestDestroyFreesEverything(t *testing.T) {
	h := newHost(t, nil)
	rec := h.create("sb-gone", nil)
	if err := h.m.Destroy(context.Background(), rec.ID); err != nil {
		t.Fatal(err)
	}
	if h.drv.Alive(rec.Spec, rec.VMM) || h.net.Exists(rec.Net) {
		t.Error("VMM or network left after destroy")
	}
	if _, err := os.Stat(filepath.Join(h.dir, "sandboxes", rec.ID)); !os.IsNotExist(err) {
		t.Errorf("directory left: %v", err)
	}
	if err := h.m.Destroy(context.Background(), rec.ID); err != nil {
		t.Errorf("destroying what is gone: %v", err)
	}
	if _, err := h.m.Get(rec.ID); !errors.Is(err, sandbox.ErrNotFound) {
		t.Errorf("Get after destroy: %v", err)
	}
	// A paused one goes too, with its snapshot.
	p := h.create("sb-paused-gone", nil)
	if _, err := h.m.Pause(context.Background(), p.ID); err != nil {
		t.Fatal(err)
	}
	if err := h.m.Destroy(context.Background(), p.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(h.dir, "snapshots", p.ID)); !os.IsNotExist(err) {
		t.Errorf("snapshot left: %v", err)
	}
	// The same id and slot are free again.
	if again := h.create("sb-gone", nil); again.Net.Slot != rec.Net.Slot {
		t.Errorf("slot %d after destroy, want %d", again.Net.Slot, rec.Net.Slot)
	}
}

func TestCapacityIsMemoryAndSlots(t *testing.T) {
	h := newHost(t, func(c *sandbox.Config) { c.HostMemoryMiB, c.Slots = 512, network.SlotRange{First: 3, Last: 5} })
	a := h.create("sb-a", nil)
	h.create("sb-b", nil)
	if a.Net.Slot != 3 {
		t.Errorf("first slot %d, want the range's first, 3", a.Net.Slot)
	}
	_, err := h.m.Create(context.Background(), sandbox.CreateParams{ID: "sb-c", Template: tpl, VCPUs: 1, MemoryMiB: 256})
	if !errors.Is(err, sandbox.ErrNoCapacity) {
		t.Fatalf("a create beyond the host's memory: %v", err)
	}
	// A paused sandbox holds no memory, but keeps its slot.
	if _, err := h.m.Pause(context.Background(), a.ID); err != nil {
		t.Fatal(err)
	}
	h.create("sb-c", nil)
	if _, err := h.m.Pause(context.Background(), "sb-c"); err != nil {
		t.Fatal(err)
	}
	_, err = h.m.Create(context.Background(), sandbox.CreateParams{ID: "sb-d", Template: tpl, VCPUs: 1, MemoryMiB: 128})
	if !errors.Is(err, sandbox.ErrNoCapacity) || !strings.Contains(err.Error(), "slots") {
		t.Fatalf("a create with every slot taken: %v", err)
	}
}

func TestCallsDoNotWaitBehindASlowCreate(t *testing.T) {
	h := newHost(t, nil)
	release := make(chan struct{})
	booting := make(chan struct{})
	h.drv.BeforeBoot = func(ctx context.Context, spec vmm.Spec) error {
		if spec.ID != "sb-slow" {
			return nil
		}
		close(booting)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := h.m.Create(context.Background(), sandbox.CreateParams{ID: "sb-slow", Template: tpl, VCPUs: 1, MemoryMiB: 256})
		done <- err
	}()
	<-booting
	start := time.Now()
	if rec, err := h.m.Get("sb-slow"); err != nil || rec.State != sandbox.Starting && rec.State != sandbox.Pending {
		t.Errorf("Get during the create: %s, %v", rec.State, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := h.m.Pause(ctx, "sb-slow")
	cancel()
	if !errors.Is(err, sandbox.ErrBusy) {
		t.Errorf("a pause during the create: %v, want ErrBusy at its deadline", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the calls waited %v", took)
	}
	// Another sandbox is made and used while this one is still booting.
	other := h.create("sb-other", nil)
	run(t, h.envd(other.ID), "true")
	if got := ids(h.m); len(got) != 2 {
		t.Errorf("listed: %v", got)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Run with -race (make test does): creates, pauses and destroys of
// different sandboxes at once, with listings between them.
func TestConcurrentOperationsKeepTheBooksStraight(t *testing.T) {
	h := newHost(t, nil)
	const n = 6
	errs := make(chan error, n)
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
				_ = h.m.List()
				_, _ = h.m.Get("sb-c0")
			}
		}
	}()
	for i := range n {
		go func() {
			id := "sb-c" + string(rune('0'+i))
			ctx := context.Background()
			_, err := h.m.Create(ctx, sandbox.CreateParams{ID: id, Template: tpl, VCPUs: 1, MemoryMiB: 256, Timeout: time.Hour})
			if err == nil && i%2 == 0 {
				_, err = h.m.Pause(ctx, id)
			}
			if err == nil {
				err = h.m.Destroy(ctx, id)
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	close(stop)
	if got := ids(h.m); len(got) != 0 {
		t.Errorf("left: %v", got)
	}
	if slots, _ := h.net.Slots(); len(slots) != 0 {
		t.Errorf("networks left: %v", slots)
	}
}
