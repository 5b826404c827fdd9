package firecracker

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/kvm"
	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	"github.com/wrenn/wrenn/internal/testutil/hostlock"
)

// kvmBinary skips the test unless this host can run the KVM suite, and
// returns the binary named by env (or found on PATH as name).
func kvmBinary(t *testing.T, env, name string) string {
	t.Helper()
	// WRENN_REQUIRE_KVM=1 (an operator's KVM host) fails what would skip.
	skip := t.Skipf
	if os.Getenv("WRENN_REQUIRE_KVM") == "1" {
		skip = t.Fatalf
	}
	if !kvm.Usable() {
		skip("KVM suite: no usable KVM on this host (needs /dev/kvm and a CPU with vmx or svm); the API conformance tests and the stand-in jailer above still ran")
	}
	if os.Geteuid() != 0 {
		skip("KVM suite: needs root for network namespaces")
	}
	if p := os.Getenv(env); p != "" {
		return p
	}
	p, err := exec.LookPath(name)
	if err != nil {
		skip("KVM suite: no %s binary on PATH (set %s)", name, env)
	}
	return p
}

// kvmVM prepares network slot and a copy of the minimal image for a VM
// named id, and returns its spec and a wait for its envd to answer.
func kvmVM(t *testing.T, ctx context.Context, slot int, id string) (vmm.Spec, func() error) {
	t.Helper()
	wrennDir, kernel, _ := guestimages.Require(t)
	hostlock.Take(t)
	nets := &network.Manager{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if err := nets.PrepareHost(ctx); err != nil {
		t.Fatal(err)
	}
	alloc, _ := network.ForSlot(slot)
	if err := nets.Setup(ctx, alloc, egress.Policy{Mode: egress.AllowAll}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nets.Teardown(context.Background(), alloc) })
	dir := t.TempDir()
	diskPath := filepath.Join(dir, "rootfs.ext4")
	if _, err := (disk.SparseCopy{}).Clone(ctx, filepath.Join(wrennDir, "images/minimal/rootfs.ext4"), diskPath, 0); err != nil {
		t.Fatal(err)
	}
	spec := vmm.Spec{
		ID: id, Kernel: kernel, Disk: diskPath, DiskFormat: "raw", VCPUs: 1, MemoryMiB: 256,
		TapDevice: alloc.Tap, MAC: alloc.MAC, NetNS: alloc.NetNS, RunDir: filepath.Join(dir, "run"),
		KernelArgs: alloc.KernelArgs([]netip.Addr{netip.MustParseAddr("1.1.1.1")}),
	}
	health := func() error {
		deadline := time.Now().Add(30 * time.Second)
		for {
			res, err := http.Get("http://" + alloc.SandboxIP.String() + ":49983/health")
			if err == nil {
				res.Body.Close()
				return nil
			}
			if time.Now().After(deadline) {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return spec, health
}

// TestFirecrackerOnKVM boots the real guest image with the real firecracker
// binary, snapshots it and restores it from the file and through the UFFD
// handler. It needs a working KVM (see kvm.Usable), a firecracker binary
// on PATH (or WRENN_FIRECRACKER), root, and the images from `make images`.
func TestFirecrackerOnKVM(t *testing.T) {
	bin := kvmBinary(t, "WRENN_FIRECRACKER", "firecracker")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	spec, health := kvmVM(t, ctx, 32002, "sb-fc-kvm")
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), bin, false)
	start := time.Now()
	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := health(); err != nil {
		t.Fatalf("envd: %v\n%s", err, vmm.LogTail(filepath.Join(spec.RunDir, "vmm.log"), 30))
	}
	t.Logf("firecracker boot to envd: %v", time.Since(start))
	self, _ := os.Executable() // runs as wrenn-agent does for "uffd-handler" (see TestMain)
	for _, mode := range []struct {
		lazy    bool
		handler string
	}{{false, ""}, {true, ""}, {true, self}} {
		snap := filepath.Join(filepath.Dir(spec.RunDir), "snap")
		if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
			t.Fatal(err)
		}
		d.LazyMemory, d.UFFDHandler = mode.lazy, mode.handler
		start = time.Now()
		if inst, err = d.Restore(ctx, spec, snap); err != nil {
			t.Fatal(err)
		}
		if err := health(); err != nil {
			t.Fatalf("envd after restore (lazy=%v, handler process %q): %v", mode.lazy, mode.handler, err)
		}
		t.Logf("restore (lazy=%v, handler process %v) to envd: %v", mode.lazy, mode.handler != "", time.Since(start))
	}
	_ = d.Stop(ctx, spec, inst)
}

// TestFirecrackerJailerOnKVM runs the same life under Firecracker's jailer:
// chroot, unprivileged uid, the sandbox's namespace, and a cgroup with the
// VM's limits under the agent's parent (this host's cgroup version). It
// needs what TestFirecrackerOnKVM needs plus a jailer binary on PATH (or
// WRENN_JAILER) of the same release as firecracker.
func TestFirecrackerJailerOnKVM(t *testing.T) {
	bin := kvmBinary(t, "WRENN_FIRECRACKER", "firecracker")
	jailerBin := kvmBinary(t, "WRENN_JAILER", "jailer")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	spec, health := kvmVM(t, ctx, 32003, "sb-fc-jailed")
	mounts, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	h, err := cgroup.Detect(mounts, "wrenn-kvm-test")
	mounts.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Prepare(); err != nil {
		t.Fatal(err)
	}
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), bin, false)
	d.Jailer = &Jailer{Binary: jailerBin, ChrootBase: filepath.Join(t.TempDir(), "jail"),
		Cgroups: &cgroup.VMMs{Hierarchy: h, OverheadMiB: 64}}
	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatalf("jailed boot: %v\n%s", err, vmm.LogTail(filepath.Join(spec.RunDir, "vmm.log"), 30))
	}
	if err := health(); err != nil {
		t.Fatalf("envd in the jailed VM: %v", err)
	}
	// The VMM runs as the jail's own user, alive as the driver sees it, in
	// a PID namespace of its own and the VM's cgroup with its limits.
	if !d.Alive(spec, inst) {
		t.Fatalf("the jailed firecracker %d is not seen as alive", inst.PID)
	}
	uid, _ := procfs.Status(inst.PID, "Uid")
	if n, _ := strconv.Atoi(strings.Fields(uid + " x")[0]); n < DefaultJailFirstID || n >= DefaultJailFirstID+DefaultJailIDs {
		t.Errorf("jailed firecracker runs as uid %q, outside the jailer ids", uid)
	}
	if ns, _ := procfs.Status(inst.PID, "NSpid"); len(strings.Fields(ns)) != 2 {
		t.Errorf("jailed firecracker's NSpid %q: want a PID namespace of its own", ns)
	}
	for _, dir := range h.Paths(spec.ID) {
		procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil || !strings.Contains(string(procs), strconv.Itoa(inst.PID)) {
			t.Errorf("jailed firecracker %d is not in %s (%v)", inst.PID, dir, err)
		}
	}
	snap := filepath.Join(filepath.Dir(spec.RunDir), "snap")
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
		t.Fatal(err)
	}
	if inst, err = d.Restore(ctx, spec, snap); err != nil {
		t.Fatal(err)
	}
	if err := health(); err != nil {
		t.Fatalf("envd after a jailed restore: %v", err)
	}
	// Lazily, through a handler process running as the jail's user.
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
		t.Fatal(err)
	}
	d.LazyMemory, d.UFFDHandler = true, mustExecutable(t)
	if inst, err = d.Restore(ctx, spec, snap); err != nil {
		t.Fatalf("jailed lazy restore: %v\n%s", err, vmm.LogTail(filepath.Join(spec.RunDir, "uffd-handler.log"), 10))
	}
	if err := health(); err != nil {
		t.Fatalf("envd after a jailed lazy restore: %v", err)
	}
	d.LazyMemory, d.UFFDHandler = false, ""
	// Its memory as a template, and a clone started from it in its place
	// (same network namespace, its own jail and copy of the disk).
	work := filepath.Dir(spec.RunDir)
	if err := d.Freeze(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}
	if err := d.SaveMemory(ctx, spec, inst, filepath.Join(work, "saved")); err != nil {
		t.Fatal(err)
	}
	if err := d.Thaw(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}
	if err := d.MakeTemplate(ctx, spec, filepath.Join(work, "saved"), filepath.Join(work, "template")); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}
	clone := spec
	clone.ID, clone.RunDir, clone.Disk = "sb-fc-jclone", filepath.Join(work, "clone-run"), filepath.Join(work, "clone.ext4")
	if err := copyFile(spec.Disk, clone.Disk); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if inst, err = d.Clone(ctx, clone, filepath.Join(work, "template")); err != nil {
		t.Fatalf("jailed clone: %v\n%s", err, vmm.LogTail(filepath.Join(clone.RunDir, "vmm.log"), 30))
	}
	if err := health(); err != nil {
		t.Fatalf("envd in the clone: %v", err)
	}
	t.Logf("clone from the memory template to envd ready in %v", time.Since(start).Round(time.Millisecond))
	spec = clone
	if err := d.Stop(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}
	for _, dir := range h.Paths(spec.ID) {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("the VM's cgroup %s outlived it (%v)", dir, err)
		}
	}
}

func mustExecutable(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return self
}
