package firecracker

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/procfs"
)

func readLog(t *testing.T, path string) []logEntry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []logEntry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e logEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// TestDriverRequestsConformToSpec runs the driver's whole lifecycle against
// the spec-enforcing stand-in and checks every request it sent.
func TestDriverRequestsConformToSpec(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "requests.jsonl")
	t.Setenv("WRENN_FAKE_FIRECRACKER", "1")
	t.Setenv("WRENN_FAKE_FC_LOG", logPath)
	self, _ := os.Executable()
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), self, false)
	spec := vmm.Spec{
		ID: "sb-fc-spec", Kernel: guestFile(t, dir, "vmlinux-6.1.0"), Disk: guestFile(t, dir, "rootfs.ext4"), DiskFormat: "raw",
		VCPUs: 2, MemoryMiB: 512, TapDevice: "tap0", MAC: "02:fc:00:00:00:01",
		KernelArgs: []string{"ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"}, RunDir: filepath.Join(dir, "run"),
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if !d.Alive(spec, inst) {
		t.Fatal("not alive after boot")
	}
	snap := filepath.Join(dir, "snapshot")
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
		t.Fatal(err)
	}
	if d.Alive(spec, inst) {
		t.Fatal("VMM still runs after the snapshot")
	}
	for _, f := range []string{stateFile, memoryFile} {
		if _, err := os.Stat(filepath.Join(snap, f)); err != nil {
			t.Fatalf("snapshot file: %v", err)
		}
	}
	inst, err = d.Restore(ctx, spec, snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(ctx, spec, inst); err != nil || d.Alive(spec, inst) {
		t.Fatalf("stop: %v", err)
	}
	if os.Geteuid() == 0 {
		d.LazyMemory = true
		inst, err = d.Restore(ctx, spec, snap)
		if err != nil {
			t.Fatal(err)
		}
		_ = d.Stop(ctx, spec, inst)
	}

	entries := readLog(t, logPath)
	var seq []string
	for _, e := range entries {
		if e.Status != 204 {
			t.Errorf("%s %s was refused: %s\nbody: %s", e.Method, e.Path, e.Fault, e.Body)
		}
		seq = append(seq, e.Method+" "+e.Path)
	}
	want := []string{
		"PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs", "PUT /entropy", "PUT /network-interfaces/eth0", "PUT /actions",
		"PATCH /vm", "PUT /snapshot/create",
		"PUT /snapshot/load",
	}
	if os.Geteuid() == 0 {
		want = append(want, "PUT /snapshot/load")
	}
	if strings.Join(seq, "|") != strings.Join(want, "|") {
		t.Fatalf("requests:\n  %s\nwant:\n  %s", strings.Join(seq, "\n  "), strings.Join(want, "\n  "))
	}
	if os.Geteuid() == 0 && entries[len(entries)-1].Note != "uffd memory verified" {
		t.Fatalf("lazy restore: %q", entries[len(entries)-1].Note)
	}
	var boot BootSource
	_ = json.Unmarshal(entries[1].Body, &boot)
	if !strings.Contains(boot.BootArgs, "init=/usr/local/bin/wrenn-init") || !strings.Contains(boot.BootArgs, "ip=169.254.0.21") {
		t.Fatalf("boot args %q", boot.BootArgs)
	}
}

// TestValidatorRejectsBadRequests proves the validator is not vacuous.
func TestValidatorRejectsBadRequests(t *testing.T) {
	bad := []struct{ method, path, body string }{
		{"PUT", "/boot-source", `{}`},
		{"PUT", "/boot-source", `{"kernel_image_path":"/k","bogus":1}`},
		{"PUT", "/machine-config", `{"vcpu_count":0,"mem_size_mib":128}`},
		{"PUT", "/machine-config", `{"vcpu_count":33,"mem_size_mib":128}`},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":"128"}`},
		{"PUT", "/drives/root", `{"drive_id":"other","is_root_device":true}`},
		{"PUT", "/drives/root", `{"drive_id":"root","is_root_device":true,"cache_type":"Fast"}`},
		{"PUT", "/actions", `{"action_type":"Boot"}`},
		{"PATCH", "/vm", `{"state":"Stopped"}`},
		{"PUT", "/snapshot/create", `{"snapshot_path":"/s"}`},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/s"}`},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_type":"File","backend_path":"/m"}}`},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/s","mem_backend":{"backend_type":"Disk","backend_path":"/m"}}`},
		{"PUT", "/network-interfaces/eth0", `{"iface_id":"eth0"}`},
		{"PUT", "/vm", `{"state":"Paused"}`},
		{"POST", "/actions", `{"action_type":"InstanceStart"}`},
	}
	for _, b := range bad {
		if _, err := validateRequest(b.method, b.path, []byte(b.body)); err == nil {
			t.Errorf("%s %s %s was accepted", b.method, b.path, b.body)
		}
	}
	good := []struct{ method, path, body string }{
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256}`},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u.sock"},"resume_vm":true}`},
	}
	for _, g := range good {
		if _, err := validateRequest(g.method, g.path, []byte(g.body)); err != nil {
			t.Errorf("%s %s %s: %v", g.method, g.path, g.body, err)
		}
	}
}

func TestDriverRefusesWhatFirecrackerCannotRun(t *testing.T) {
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), "firecracker", false)
	for name, spec := range map[string]vmm.Spec{
		"qcow2 disk": {ID: "sb-x", DiskFormat: "qcow2", VCPUs: 1},
		"bad id":     {ID: "sb_x!", VCPUs: 1},
		"33 vcpus":   {ID: "sb-x", VCPUs: 33},
	} {
		if _, err := d.Boot(context.Background(), spec); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestDiffSnapshots pauses a resumed VM again: the second snapshot is a
// Diff, merged into the memory kept from the resume.
func TestDiffSnapshots(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "requests.jsonl")
	t.Setenv("WRENN_FAKE_FIRECRACKER", "1")
	t.Setenv("WRENN_FAKE_FC_LOG", logPath)
	self, _ := os.Executable()
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), self, false)
	d.DiffSnapshots = true
	spec := vmm.Spec{ID: "sb-fc-diff", Kernel: guestFile(t, dir, "vmlinux"), Disk: guestFile(t, dir, "disk"), DiskFormat: "raw", VCPUs: 1, MemoryMiB: 128, RunDir: filepath.Join(dir, "run")}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	snap := filepath.Join(dir, "snapshot")

	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil { // full: nothing to diff against yet
		t.Fatal(err)
	}
	if inst, err = d.Restore(ctx, spec, snap); err != nil {
		t.Fatal(err)
	}
	// The agent removes the snapshot after a resume; the base stays in RunDir.
	if err := os.RemoveAll(snap); err != nil {
		t.Fatal(err)
	}
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil { // diff, merged
		t.Fatal(err)
	}
	mem, err := os.ReadFile(filepath.Join(snap, memoryFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(mem, []byte("guest memory page")) || !bytes.HasPrefix(mem[4096:], []byte("dirty page")) || len(mem) != 4096*8 {
		t.Fatalf("merged memory: %q ... %q (%d bytes)", mem[:17], mem[4096:4106], len(mem))
	}
	if inst, err = d.Restore(ctx, spec, snap); err != nil {
		t.Fatal(err)
	}
	_ = d.Stop(ctx, spec, inst)

	var kinds []string
	for _, e := range readLog(t, logPath) {
		if e.Status != 204 {
			t.Fatalf("%s %s refused: %s", e.Method, e.Path, e.Fault)
		}
		if e.Path == "/snapshot/create" {
			kinds = append(kinds, e.Note)
		}
	}
	if strings.Join(kinds, ",") != "full,diff" {
		t.Fatalf("snapshots written: %v", kinds)
	}
}

// TestJailer runs the jailed lifecycle against a stand-in jailer that
// checks its command line and the staged jail.
func TestJailer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("staging files for another user needs root")
	}
	dir, logPath, bin := fakeJailerSetup(t)
	kernel, rootfs := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "rootfs.ext4")
	_ = os.WriteFile(kernel, []byte("kernel"), 0o644)
	_ = os.WriteFile(rootfs, []byte("disk"), 0o644)
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), filepath.Join(bin, "firecracker"), true)
	d.UFFDHandler = filepath.Join(bin, "firecracker") // this binary, run as wrenn-agent runs it
	// The jailer makes the VM's cgroup under the agent's parent; here that
	// parent is a plain directory standing in for a cgroup v1 layout.
	cgroups := &cgroup.VMMs{Hierarchy: cgroup.Hierarchy{Parent: "wrenn", Dirs: map[string]string{
		"cpu": filepath.Join(dir, "cg", "cpu", "wrenn"), "memory": filepath.Join(dir, "cg", "memory", "wrenn"), "pids": filepath.Join(dir, "cg", "pids", "wrenn"),
	}}, OverheadMiB: 64}
	d.Jailer = &Jailer{Binary: filepath.Join(bin, "jailer"), ChrootBase: filepath.Join(dir, "jail"), Cgroups: cgroups}
	spec := vmm.Spec{ID: "sb-jailed", Kernel: kernel, Disk: rootfs, DiskFormat: "raw", VCPUs: 2, MemoryMiB: 256, RunDir: filepath.Join(dir, "run")}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	jailRoot := filepath.Join(dir, "jail", "firecracker", "sb-jailed", "root")

	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	// The VMM is the Firecracker the jailer forked, named by its pid file,
	// and known as alive (the jailer passes "--id" and the id apart).
	pid, _ := os.ReadFile(filepath.Join(jailRoot, "firecracker.pid"))
	if strconv.Itoa(inst.PID) != string(pid) || !d.Alive(spec, inst) {
		t.Fatalf("instance %+v, pid file %q, alive %v", inst, pid, d.Alive(spec, inst))
	}
	if ns, _ := procfs.Status(inst.PID, "NSpid"); len(strings.Fields(ns)) != 2 {
		t.Fatalf("the jailed Firecracker's NSpid %q: want a PID namespace of its own", ns)
	}
	if uid, _ := procfs.Status(inst.PID, "Uid"); !strings.HasPrefix(uid, strconv.Itoa(ownerOf(t, jailRoot))) {
		t.Fatalf("the jailed Firecracker runs as uid %q, not its jail's user", uid)
	}
	jailUID := ownerOf(t, jailRoot)
	if jailUID < DefaultJailFirstID || jailUID >= DefaultJailFirstID+DefaultJailIDs {
		t.Fatalf("the jail is owned by %d, outside the jailer ids", jailUID)
	}
	if owner := ownerOf(t, filepath.Join(jailRoot, "rootfs")); owner != jailUID {
		t.Fatalf("the disk is staged for %d, not the jail's user %d", owner, jailUID)
	}
	// The kernel every sandbox boots is not given away.
	if owner := ownerOf(t, kernel); owner != os.Geteuid() {
		t.Fatalf("the host's kernel now belongs to %d", owner)
	}
	if fi, err := os.Stat(filepath.Join(jailRoot, "vmlinux")); err != nil || fi.Mode().Perm()&0o222 != 0 && ownerOf(t, filepath.Join(jailRoot, "vmlinux")) == jailUID {
		t.Fatalf("the jail's kernel is writable by the jailed user: %v", err)
	}
	snap := filepath.Join(dir, "snapshot")
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
		t.Fatal(err)
	}
	if vmm.ProcessAlive(vmm.Instance{PID: inst.PID}, "") {
		t.Fatalf("the jailed Firecracker (pid %d) runs on after the snapshot stopped it", inst.PID)
	}
	if owner := ownerOf(t, rootfs); owner != os.Geteuid() {
		t.Fatalf("the disk still belongs to %d after its jail went", owner)
	}
	if _, err := os.Stat(filepath.Join(dir, "jail", "firecracker", "sb-jailed")); !os.IsNotExist(err) {
		t.Fatal("the jail outlived its VMM")
	}
	for _, f := range []string{stateFile, memoryFile} {
		if _, err := os.Stat(filepath.Join(snap, f)); err != nil {
			t.Fatalf("snapshot not moved out of the jail: %v", err)
		}
	}
	if inst, err = d.Restore(ctx, spec, snap); err != nil { // lazily, through the jailed UFFD socket
		t.Fatal(err)
	}
	if err := d.Stop(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}

	entries := readLog(t, logPath)
	var jailers int
	for _, e := range entries {
		if e.Status != 204 {
			t.Fatalf("%s %s refused: %s", e.Method, e.Path, e.Fault)
		}
		if e.Method == "JAILER" {
			jailers++
			// Two vCPUs and a quarter for the VMM; twice 256 MiB and 64 for the VMM.
			for _, want := range []string{"--new-pid-ns", "--cgroup-version 1", "--parent-cgroup wrenn", "--cgroup cpu.cfs_quota_us=225000",
				"--cgroup cpu.cfs_period_us=100000", "--cgroup memory.limit_in_bytes=603979776", "--cgroup pids.max=136"} {
				if !strings.Contains(e.Path, want) {
					t.Fatalf("jailer arguments lack %q: %s", want, e.Path)
				}
			}
		}
		var body map[string]any
		_ = json.Unmarshal(e.Body, &body)
		for _, field := range []string{"kernel_image_path", "path_on_host", "snapshot_path", "mem_file_path"} {
			if p, ok := body[field].(string); ok && strings.HasPrefix(p, dir) {
				t.Fatalf("%s %s sent a host path %q to a jailed firecracker", e.Method, e.Path, p)
			}
		}
	}
	if jailers != 2 {
		t.Fatalf("jailer ran %d times, want 2 (boot and restore)", jailers)
	}
	if last := entries[len(entries)-1]; last.Note != "uffd memory verified" {
		t.Fatalf("jailed lazy restore: %+v", last)
	}
}

// Jailed clones: a paused VM's full snapshot becomes a template whose
// files every clone's jail links read only (no jailed user may change
// them), and each clone loads it in a fresh jailed Firecracker with its
// own disk at the same jailed path.
func TestJailedClones(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("staging files for another user needs root")
	}
	dir, logPath, bin := fakeJailerSetup(t)
	kernel := filepath.Join(dir, "vmlinux")
	_ = os.WriteFile(kernel, []byte("kernel"), 0o644)
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), filepath.Join(bin, "firecracker"), false)
	if d.CloneSupport() == nil {
		t.Fatal("a direct Firecracker claims it can clone")
	}
	d = New(slog.New(slog.NewTextHandler(io.Discard, nil)), filepath.Join(bin, "firecracker"), false)
	d.Jailer = &Jailer{Binary: filepath.Join(bin, "jailer"), ChrootBase: filepath.Join(dir, "jail")}
	if err := d.CloneSupport(); err != nil {
		t.Fatal(err)
	}
	specFor := func(id string) vmm.Spec {
		disk := filepath.Join(dir, id+".ext4")
		_ = os.WriteFile(disk, []byte("disk of "+id), 0o600)
		return vmm.Spec{ID: id, Kernel: kernel, Disk: disk, DiskFormat: "raw", VCPUs: 1, MemoryMiB: 256, RunDir: filepath.Join(dir, id, "run")}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	origin := specFor("sb-origin")
	inst, err := d.Boot(ctx, origin)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Freeze(ctx, origin, inst); err != nil {
		t.Fatal(err)
	}
	saved := filepath.Join(dir, "saved")
	if err := d.SaveMemory(ctx, origin, inst, saved); err != nil {
		t.Fatal(err)
	}
	if err := d.Thaw(ctx, origin, inst); err != nil {
		t.Fatalf("the origin after its memory was saved: %v", err)
	}
	tpl := filepath.Join(dir, "template")
	if err := d.MakeTemplate(ctx, origin, saved, tpl); err != nil {
		t.Fatal(err)
	}
	users := map[int]string{ownerOf(t, filepath.Join(dir, "jail", "firecracker", "sb-origin", "root")): "sb-origin"}
	for _, id := range []string{"sb-clone-1", "sb-clone-2"} {
		spec := specFor(id)
		c, err := d.Clone(ctx, spec, tpl)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		root := filepath.Join(dir, "jail", "firecracker", id, "root")
		uid := ownerOf(t, root)
		if other, taken := users[uid]; taken {
			t.Fatalf("%s runs as uid %d, as %s does", id, uid, other)
		}
		users[uid] = id
		for _, f := range []string{jailedTemplateState, jailedTemplateMemory} {
			fi, err := os.Stat(filepath.Join(root, f))
			if err != nil {
				t.Fatalf("%s: %s not in the jail: %v", id, f, err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			if int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o222 != 0 {
				t.Fatalf("%s: %s is %v owned by %d: the jailed user could change the template", id, f, fi.Mode(), st.Uid)
			}
		}
		if disk, _ := os.ReadFile(filepath.Join(root, "rootfs")); string(disk) != "disk of "+id {
			t.Fatalf("%s's jail has the disk %q", id, disk)
		}
		// Each clone stays up while the next starts: their users differ.
		defer func() { _ = d.Stop(ctx, spec, c) }()
	}
	if err := d.Stop(ctx, origin, inst); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{stateFile, memoryFile} {
		fi, err := os.Stat(filepath.Join(tpl, f))
		if err != nil || fi.Sys().(*syscall.Stat_t).Uid != uint32(os.Geteuid()) {
			t.Fatalf("the template's %s after the clones: %v", f, err)
		}
	}
	var loads int
	for _, e := range readLog(t, logPath) {
		if e.Status != 204 {
			t.Fatalf("%s %s refused: %s", e.Method, e.Path, e.Fault)
		}
		if e.Path == "/snapshot/load" {
			loads++
			var body SnapshotLoad
			_ = json.Unmarshal(e.Body, &body)
			if body.SnapshotPath != jailedTemplateState || body.MemBackend == nil || body.MemBackend.BackendType != "File" || body.MemBackend.BackendPath != jailedTemplateMemory || !body.ResumeVM {
				t.Fatalf("snapshot/load: %s", e.Body)
			}
		}
	}
	if loads != 2 {
		t.Fatalf("%d snapshot loads, want 2", loads)
	}
}

// guestFile makes a stand-in kernel or disk the fake firecracker opens.
func guestFile(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func ownerOf(t *testing.T, path string) int {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(fi.Sys().(*syscall.Stat_t).Uid)
}

// fakeJailerSetup gives a test a directory with firecracker and jailer
// stand-ins in bin/ (this test binary, which acts as either) and the
// request log they write.
func fakeJailerSetup(t *testing.T) (dir, logPath, bin string) {
	t.Helper()
	dir = t.TempDir()
	logPath = filepath.Join(dir, "requests.jsonl")
	t.Setenv("WRENN_FAKE_JAILER", "1")
	t.Setenv("WRENN_FAKE_FC_LOG", logPath)
	self, _ := os.Executable()
	bin = filepath.Join(dir, "bin")
	_ = os.Mkdir(bin, 0o755)
	for _, name := range []string{"firecracker", "jailer"} {
		if err := os.Symlink(self, filepath.Join(bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir, logPath, bin
}

// A lazy restore whose memory cannot be served ends the VM at once, with
// the reason kept for the sandbox's error, instead of leaving a guest
// that hangs on its first untouched page while it looks running: with the
// handler in the agent, and in a process of its own.
func TestLazyRestoreEndsTheVMWhenItsMemoryCannotBeServed(t *testing.T) {
	for _, mode := range []string{"in the agent", "in its own process"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			t.Setenv("WRENN_FAKE_FIRECRACKER", "1")
			t.Setenv("WRENN_FAKE_FC_LOG", filepath.Join(dir, "requests.jsonl"))
			self, _ := os.Executable()
			d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), self, false)
			spec := vmm.Spec{ID: "sb-fc-lazy", Kernel: guestFile(t, dir, "vmlinux"), Disk: guestFile(t, dir, "disk"), DiskFormat: "raw", VCPUs: 1, MemoryMiB: 128, RunDir: filepath.Join(dir, "run")}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			inst, err := d.Boot(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			snap := filepath.Join(dir, "snapshot")
			if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
				t.Fatal(err)
			}
			// The memory file loses its tail: the guest's regions reach beyond it.
			if err := os.Truncate(filepath.Join(snap, memoryFile), 4096); err != nil {
				t.Fatal(err)
			}
			lazy := New(d.Log, self, true)
			if mode == "in its own process" {
				lazy.UFFDHandler = self
			}
			start := time.Now()
			if inst, err = lazy.Restore(ctx, spec, snap); err == nil {
				_ = lazy.Stop(ctx, spec, inst)
				t.Fatal("a restore whose memory cannot be served succeeded")
			}
			if took := time.Since(start); took > 15*time.Second {
				t.Fatalf("the failed lazy restore took %v", took)
			}
			why := ""
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				if why = vmm.ExitReason(spec.RunDir); why != "" {
					break
				}
			}
			if !strings.Contains(why, "memory could not be served") || !strings.Contains(why, "beyond") {
				t.Fatalf("recorded reason %q", why)
			}
			if lazy.UFFDHandler != "" {
				if log, _ := os.ReadFile(filepath.Join(spec.RunDir, "uffd-handler.log")); !strings.Contains(string(log), "ending the VM") {
					t.Errorf("the handler process did not end the VM: %s", log)
				}
			}
		})
	}
}

// A lazy restore through the handler process: it serves the VM's memory
// and ends once every page is in, leaving the VM running.
func TestLazyRestoreThroughAHandlerProcess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the stand-in Firecracker's userfaultfd needs root here")
	}
	dir := t.TempDir()
	logPath := filepath.Join(dir, "requests.jsonl")
	t.Setenv("WRENN_FAKE_FIRECRACKER", "1")
	t.Setenv("WRENN_FAKE_FC_LOG", logPath)
	self, _ := os.Executable()
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), self, false)
	spec := vmm.Spec{ID: "sb-fc-handler", Kernel: guestFile(t, dir, "vmlinux"), Disk: guestFile(t, dir, "disk"), DiskFormat: "raw", VCPUs: 1, MemoryMiB: 128, RunDir: filepath.Join(dir, "run")}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(dir, "snapshot")
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
		t.Fatal(err)
	}
	lazy := New(d.Log, self, true)
	lazy.UFFDHandler = self
	if inst, err = lazy.Restore(ctx, spec, snap); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = lazy.Stop(context.Background(), spec, inst) }()
	if entries := readLog(t, logPath); entries[len(entries)-1].Note != "uffd memory verified" {
		t.Fatalf("lazy restore: %q", entries[len(entries)-1].Note)
	}
	// With every page in, it has nothing left to serve and ends.
	for deadline := time.Now().Add(10 * time.Second); handlerState(spec) != stateEnded; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the handler's state is %q", handlerState(spec))
		}
	}
	if log, _ := os.ReadFile(filepath.Join(spec.RunDir, "uffd-handler.log")); !strings.Contains(string(log), "every page is in") {
		t.Errorf("handler log: %s", log)
	}
	if st := handlerState(spec); st != stateEnded {
		t.Errorf("handler state %q after it finished", st)
	}
	if !lazy.Alive(spec, inst) {
		t.Error("the VM ended with its handler")
	}
}

// The handler process runs as its VMM's user (a jail's own, or the
// agent's with no capability), with nothing in its environment, in a
// session of its own (a signal to the agent's group leaves it serving).
// If it dies while its VM runs, the VM is ended with the reason; if the
// VM goes first, it ends quietly.
func TestHandlerProcessRunsAsItsVMMAndEndsWithIt(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a jail's user, and the stand-in jailer, need root")
	}
	for _, mode := range []string{"direct", "jailed"} {
		t.Run(mode, func(t *testing.T) {
			dir, _, bin := fakeJailerSetup(t)
			d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), filepath.Join(bin, "firecracker"), true)
			d.UFFDHandler = filepath.Join(bin, "firecracker")
			if mode == "jailed" {
				// A short base: the API socket's host path must fit a socket
				// address (the stand-in jailer does not chroot).
				base, err := os.MkdirTemp("", "j")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = os.RemoveAll(base) })
				d.Jailer = &Jailer{Binary: filepath.Join(bin, "jailer"), ChrootBase: base}
			} else {
				t.Setenv("WRENN_FAKE_JAILER", "")
				t.Setenv("WRENN_FAKE_FIRECRACKER", "1")
			}
			spec := vmm.Spec{ID: "sb-h-" + mode, Kernel: guestFile(t, dir, "vmlinux"), Disk: guestFile(t, dir, "disk"), DiskFormat: "raw", VCPUs: 1, MemoryMiB: 128, RunDir: filepath.Join(dir, "run")}
			mem := guestFile(t, dir, "memory")
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			// spawn starts a handler for a running VM that waits for the
			// VMM's connection (none comes here) and returns its pid.
			spawn := func() (vmm.Instance, vmm.Instance) {
				t.Helper()
				inst, err := d.Boot(ctx, spec)
				if err != nil {
					t.Fatalf("%v\n%s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 20))
				}
				h, err := d.listenUFFD(spec, mem)
				if err != nil {
					t.Fatal(err)
				}
				h.serve(d, spec, inst)
				return inst, waitServing(t, spec, inst)
			}

			inst, handler := spawn()
			pid := handler.PID
			wantUID := "0"
			if mode == "jailed" {
				if uid, _ := procfs.Status(inst.PID, "Uid"); uid != "" {
					wantUID = strings.Fields(uid)[0]
				}
				if wantUID == "0" {
					t.Fatal("the jailed VMM runs as root")
				}
			}
			// Every thread of it (it is serving: its state says so).
			tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
			if len(tasks) == 0 {
				t.Fatal("no threads of the handler found")
			}
			for _, task := range tasks {
				status, _ := os.ReadFile(task)
				fields := map[string]string{}
				for _, line := range strings.Split(string(status), "\n") {
					if k, v, ok := strings.Cut(line, ":"); ok {
						fields[k] = strings.TrimSpace(v)
					}
				}
				if ids := strings.Fields(fields["Uid"]); len(ids) != 4 || ids[0] != wantUID || ids[1] != wantUID || ids[2] != wantUID {
					t.Errorf("%s: uid %q, want the VMM's %s", task, fields["Uid"], wantUID)
				}
				for field, want := range map[string]string{"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "CapInh": "0000000000000000",
					"CapAmb": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1"} {
					if fields[field] != want {
						t.Errorf("%s: %s = %q, want %s", task, field, fields[field], want)
					}
				}
			}
			if env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid)); err != nil || len(env) != 0 {
				t.Errorf("the handler's environment: %q, %v", env, err)
			}
			stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) < 4 || f[3] != strconv.Itoa(pid) {
				t.Errorf("the handler is not in a session of its own: %q", stat)
			}

			// Killed while its VM runs: the VM goes too, with the reason.
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(10 * time.Second); d.Alive(spec, inst); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the VM runs on without its memory's handler")
				}
			}
			if why := vmm.ExitReason(spec.RunDir); !strings.Contains(why, "page-fault handler") {
				t.Errorf("reason %q", why)
			}
			_ = d.Stop(ctx, spec, inst)

			// Its VM stopped: the handler goes with it at once, recording
			// nothing, and the VM is not ended for it.
			inst, handler = spawn()
			if err := d.Stop(ctx, spec, inst); err != nil {
				t.Fatal(err)
			}
			if handlerRuns(handler, spec.ID) {
				t.Error("the handler outlived the stop of its VM")
			}
			if why := vmm.ExitReason(spec.RunDir); why != "" {
				t.Errorf("a reason after a normal stop: %q", why)
			}
			// A VMM that exits on its own (a pause) ends its handler too,
			// which then says it ended with its VMM, not that it failed.
			inst, handler = spawn()
			if err := syscall.Kill(inst.PID, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			if err := vmm.WaitGone(ctx, handler.PID); err != nil {
				t.Fatal(err)
			}
			if why := vmm.ExitReason(spec.RunDir); why != "" {
				t.Errorf("a reason after the VMM exited: %q", why)
			}
			if log, _ := os.ReadFile(filepath.Join(spec.RunDir, handlerLogFile)); !strings.Contains(string(log), "ended with its VMM") {
				t.Errorf("handler log: %s", log)
			}
			_ = d.Stop(ctx, spec, inst)
		})
	}
}

// After an agent restart, the new agent watches a handler process the
// earlier one started (Adopt): if it dies before it has finished, the VM
// is ended with the reason; one that finished is left alone.
func TestAdoptWatchesAnEarlierAgentsHandler(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the stand-in Firecracker's checks need root here")
	}
	dir, _, bin := fakeJailerSetup(t)
	t.Setenv("WRENN_FAKE_JAILER", "")
	t.Setenv("WRENN_FAKE_FIRECRACKER", "1")
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), filepath.Join(bin, "firecracker"), true)
	spec := vmm.Spec{ID: "sb-adopt", Kernel: guestFile(t, dir, "vmlinux"), Disk: guestFile(t, dir, "disk"), DiskFormat: "raw", VCPUs: 1, MemoryMiB: 128, RunDir: filepath.Join(dir, "run")}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Stop(context.Background(), spec, inst) }()
	// What an earlier agent left: a handler process it started (not this
	// process's child, so nothing here waits for it), serving.
	h, err := d.listenUFFD(spec, guestFile(t, dir, "memory"))
	if err != nil {
		t.Fatal(err)
	}
	earlier := New(d.Log, d.Binary, true)
	earlier.UFFDHandler = filepath.Join(bin, "firecracker")
	if err := startDetached(h, earlier, spec, inst); err != nil {
		t.Fatal(err)
	}
	handler := waitServing(t, spec, inst)
	if !handlerRuns(handler, spec.ID) {
		t.Fatalf("handler %+v is not seen running", handler)
	}
	d.Adopt(spec, inst)
	if err := syscall.Kill(handler.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); d.Alive(spec, inst); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the VM runs on after the earlier agent's handler died")
		}
	}
	if why := vmm.ExitReason(spec.RunDir); !strings.Contains(why, "no agent watched it") {
		t.Errorf("reason %q", why)
	}
	// A state left by another VMM's handler (this VM was booted, or
	// restored from a file, since) is not this VM's: nothing is ended.
	if inst, err = d.Boot(ctx, spec); err != nil {
		t.Fatal(err)
	}
	d.Adopt(spec, inst)
	// And a handler that finished leaves nothing to watch.
	h, err = d.listenUFFD(spec, guestFile(t, dir, "memory"))
	if err != nil {
		t.Fatal(err)
	}
	if err := startDetached(h, earlier, spec, inst); err != nil {
		t.Fatal(err)
	}
	handler = waitServing(t, spec, inst)
	_ = os.WriteFile(filepath.Join(spec.RunDir, handlerStateFile), []byte(stateEnded), 0o600)
	d.Adopt(spec, inst)
	_ = syscall.Kill(handler.PID, syscall.SIGKILL)
	time.Sleep(3 * aliveEvery)
	if !d.Alive(spec, inst) {
		t.Error("a VM whose handler had finished, or whose state was another VMM's, was ended")
	}
}

// startDetached starts a handler process as an earlier agent would have,
// leaving it to be reaped when the test process ends (no waiter acts on
// its death).
func startDetached(h *uffdHandler, d *Driver, spec vmm.Spec, inst vmm.Instance) error {
	cmd, err := h.start(d, spec, inst)
	if err != nil {
		return err
	}
	go func() { _ = cmd.Wait() }() // reaped, nothing more
	return nil
}

// waitServing waits for the handler of inst to say it serves, and returns it.
func waitServing(t *testing.T, spec vmm.Spec, inst vmm.Instance) vmm.Instance {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if st := readHandlerState(spec); st.serving && st.vmm == inst {
			return st.handler
		}
		if time.Now().After(deadline) {
			t.Fatalf("no handler serving %+v: %q", inst, handlerState(spec))
		}
	}
}

func handlerState(spec vmm.Spec) string {
	b, _ := os.ReadFile(filepath.Join(spec.RunDir, handlerStateFile))
	return strings.Fields(string(b) + " ")[0]
}
