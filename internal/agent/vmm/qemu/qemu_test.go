package qemu

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	"github.com/wrenn/wrenn/internal/testutil/hostlock"
	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

func waitEnvd(ctx context.Context, url string) error {
	client := &http.Client{Timeout: 500 * time.Millisecond}
	for {
		res, err := client.Get(url + "/health")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusNoContent {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("envd at %s: %w", url, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestBootSnapshotRestoreKeepsMemory(t *testing.T) {
	_, kernel, rootfs := guestimages.Require(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	hostlock.Take(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	nets := &network.Manager{Log: log}
	if err := nets.PrepareHost(ctx); err != nil {
		t.Fatal(err)
	}
	alloc, _ := network.ForSlot(32001)
	if err := nets.Setup(ctx, alloc, egress.Policy{Mode: egress.AllowAll}); err != nil {
		t.Fatal(err)
	}
	defer nets.Teardown(context.Background(), alloc)

	dir := t.TempDir()
	dsk, err := disk.Qcow2{}.Clone(ctx, rootfs, filepath.Join(dir, "rootfs.qcow2"), 0)
	if err != nil {
		t.Fatal(err)
	}
	spec := vmm.Spec{
		ID: "sb-drivertest", Kernel: kernel, Disk: dsk.Path, DiskFormat: dsk.Format,
		VCPUs: 1, MemoryMiB: 256, TapDevice: alloc.Tap, MAC: alloc.MAC, NetNS: alloc.NetNS,
		KernelArgs: append(alloc.KernelArgs([]netip.Addr{netip.MustParseAddr("1.1.1.1")}), "wrenn.hostname=drivertest"),
		RunDir:     filepath.Join(dir, "run"),
	}
	d := New(log)
	start := time.Now()
	inst, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop(context.Background(), spec, inst)
	url := "http://" + alloc.SandboxIP.String() + ":49983"
	if err := waitEnvd(ctx, url); err != nil {
		t.Fatalf("%v\nconsole: %s", err, vmm.LogTail(vmm.LogPath(spec.RunDir), 40))
	}
	t.Logf("booted to envd in %v (%s)", time.Since(start).Round(time.Millisecond), d.Accelerator())
	// QEMU runs under its seccomp sandbox: no privilege changes, no obsolete calls.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", inst.PID))
	if err != nil || !strings.Contains(string(status), "Seccomp:\t2") {
		t.Fatalf("QEMU is not confined by seccomp (filter mode 2): %v\n%s", err, status)
	}
	// Its filter denies new processes: snapshots below travel through
	// files passed over QMP, not through an exec: helper.
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", inst.PID)); !strings.Contains(string(cmdline), "spawn=deny") {
		t.Fatalf("QEMU's seccomp filter allows spawning: %q", cmdline)
	}

	// A process that counts in memory only.
	client := processconnect.NewProcessClient(http.DefaultClient, url)
	tag := "counter"
	no := false
	stream, err := client.Start(ctx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done"}},
		Tag:     &tag, Stdin: &no,
	}))
	if err != nil {
		t.Fatal(err)
	}
	last := ""
	for stream.Receive() {
		if out := stream.Msg().GetEvent().GetData().GetStdout(); len(out) > 0 {
			last = strings.TrimSpace(string(out))
			if last == "3" {
				break
			}
		}
	}
	stream.Close()

	snap := filepath.Join(dir, "snapshot")
	start = time.Now()
	if err := d.Snapshot(ctx, spec, inst, snap); err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot in %v", time.Since(start).Round(time.Millisecond))
	if d.Alive(spec, inst) {
		t.Fatal("qemu still runs after the snapshot")
	}
	start = time.Now()
	inst, err = d.Restore(ctx, spec, snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := waitEnvd(ctx, url); err != nil {
		t.Fatal(err)
	}
	t.Logf("restored to envd in %v", time.Since(start).Round(time.Millisecond))

	again, err := client.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}}))
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	for again.Receive() {
		out := strings.TrimSpace(string(again.Msg().GetEvent().GetData().GetStdout()))
		if out == "" {
			continue
		}
		var n int
		fmt.Sscanf(out, "%d", &n)
		if n < 3 {
			t.Fatalf("counter restarted: got %q after %s", out, last)
		}
		t.Logf("counter continued at %d (was %s before the snapshot)", n, last)
		break
	}
	if err := d.Stop(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}
	if d.Alive(spec, inst) {
		t.Fatal("qemu alive after Stop")
	}
}
