package disk

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/wrenn/wrenn/internal/agent/disk/devmapper"
	"github.com/wrenn/wrenn/internal/agent/disk/loopdev"
)

func template(t *testing.T, size int) string {
	t.Helper()
	base := filepath.Join(t.TempDir(), "base.ext4")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0x5a}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	return base
}

func TestQcow2AndCopyLeaveTheTemplateAlone(t *testing.T) {
	ctx := context.Background()
	base := template(t, 4<<20)
	for _, c := range []Cloner{Qcow2{}, SparseCopy{}} {
		dest := filepath.Join(t.TempDir(), "disk")
		d, err := c.Clone(ctx, base, dest, 8<<20)
		if err != nil {
			t.Fatalf("%s: %v", c.Name(), err)
		}
		info, _ := exec.Command("qemu-img", "info", "--output=json", d.Path).Output()
		if !bytes.Contains(info, []byte(`"virtual-size": 8388608`)) || !bytes.Contains(info, []byte(`"format": "`+d.Format+`"`)) {
			t.Fatalf("%s: disk %s", c.Name(), info)
		}
		if err := c.Release(ctx, dest); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(dest); !os.IsNotExist(err) || c.Release(ctx, dest) != nil {
			t.Fatalf("%s: release left %s", c.Name(), dest)
		}
	}
	if got, _ := os.ReadFile(base); !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 4<<20)) {
		t.Fatal("template changed")
	}
}

// TestSharedLoopDevice exercises the part of the device-mapper driver this
// machine can run: one read-only loop device per template, shared, and
// detached once nothing holds it.
func TestSharedLoopDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	ctx := context.Background()
	base := template(t, 4<<20)
	first, err := AttachShared(ctx, base)
	if err != nil {
		t.Skipf("no loop devices here: %v", err)
	}
	t.Cleanup(func() { _ = DetachIfUnused(ctx, first) })
	second, err := AttachShared(ctx, base)
	if err != nil || second != first {
		t.Fatalf("second attach: %s, %v (first %s)", second, err, first)
	}
	if ro, _ := os.ReadFile("/sys/block/" + filepath.Base(first) + "/ro"); string(bytes.TrimSpace(ro)) != "1" {
		t.Fatal("template loop device is writable")
	}
	if err := DetachIfUnused(ctx, first); err != nil {
		t.Fatal(err)
	}
	if devs, _ := loopdev.Find(base); len(devs) != 0 {
		t.Fatalf("still attached: %v", devs)
	}
	if err := DetachIfUnused(ctx, first); err != nil {
		t.Fatalf("detaching twice: %v", err)
	}
}

// requireDeviceMapper skips where device-mapper cannot run (root and
// /dev/mapper/control are needed); WRENN_REQUIRE_DM=1 (make test-kvm)
// fails instead.
func requireDeviceMapper(t *testing.T) {
	t.Helper()
	skip := t.Skipf
	if os.Getenv("WRENN_REQUIRE_DM") == "1" {
		skip = t.Fatalf
	}
	if os.Geteuid() != 0 {
		skip("device-mapper needs root")
	}
	if err := Available(); err != nil {
		skip("device-mapper suite: %v", err)
	}
}

// Creates and releases of one template's disks at once: the shared
// template loop is attached once, never detached under a disk that uses
// it, and gone with the last one.
func TestDeviceMapperConcurrentClonesAndReleases(t *testing.T) {
	requireDeviceMapper(t)
	ctx := context.Background()
	base := template(t, 4<<20)
	dm := &DeviceMapper{}
	root := t.TempDir()
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dest := filepath.Join(root, fmt.Sprintf("sb-race%d", i), "rootfs.dm")
			_ = os.MkdirAll(filepath.Dir(dest), 0o755)
			d, err := dm.Clone(ctx, base, dest, 0)
			if err != nil {
				errs <- err
				return
			}
			// Every disk reads its template through the shared origin.
			f, err := os.Open(d.Path)
			if err == nil {
				b := make([]byte, 4096)
				_, err = f.ReadAt(b, 1<<20)
				f.Close()
				if err == nil && b[0] != 0x5a {
					err = fmt.Errorf("disk %d reads %#x where its template has 0x5a", i, b[0])
				}
			}
			if err != nil {
				errs <- err
			}
			if i%2 == 0 {
				errs <- dm.Release(ctx, dest)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if devs, _ := loopdev.Find(base); len(devs) != 1 {
		t.Fatalf("template attached %d times with disks left, want once: %v", len(devs), devs)
	}
	for i := 1; i < n; i += 2 {
		if err := dm.Release(ctx, filepath.Join(root, fmt.Sprintf("sb-race%d", i), "rootfs.dm")); err != nil {
			t.Fatal(err)
		}
	}
	if devs, _ := loopdev.Find(base); len(devs) != 0 {
		t.Fatalf("template loop left after the last release: %v", devs)
	}
}

// TestDeviceMapperSnapshot runs where device-mapper exists.
func TestDeviceMapperSnapshot(t *testing.T) {
	requireDeviceMapper(t)
	ctx := context.Background()
	base := template(t, 4<<20)
	dir := filepath.Join(t.TempDir(), "sb-dmtest")
	_ = os.Mkdir(dir, 0o755)
	dm := &DeviceMapper{}
	var disks []string
	for _, name := range []string{"a", "b"} {
		dest := filepath.Join(dir, name, "rootfs.dm")
		_ = os.MkdirAll(filepath.Dir(dest), 0o755)
		d, err := dm.Clone(ctx, base, dest, 0)
		if err != nil {
			t.Fatal(err)
		}
		disks = append(disks, dest)
		f, err := os.OpenFile(d.Path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = f.WriteAt(bytes.Repeat([]byte(name), 4096), 0)
		f.Close()
	}
	devs, _ := loopdev.Find(base)
	if len(devs) != 1 {
		t.Fatalf("template attached %d times, want once: %v", len(devs), devs)
	}
	for _, dest := range disks {
		if err := dm.Release(ctx, dest); err != nil {
			t.Fatal(err)
		}
	}
	if devs, _ := loopdev.Find(base); len(devs) != 0 {
		t.Fatalf("template loop device left: %v", devs)
	}
	if got, _ := os.ReadFile(base); !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 4<<20)) {
		t.Fatal("template changed")
	}
}

// A device-mapper disk may be larger than its template, and comes back
// with what the sandbox wrote after its devices are gone (a reboot).
func TestDeviceMapperGrowsAndReattaches(t *testing.T) {
	requireDeviceMapper(t)
	ctx := context.Background()
	base := template(t, 4<<20)
	dest := filepath.Join(t.TempDir(), "sb-dmgrow", "rootfs.dm")
	_ = os.MkdirAll(filepath.Dir(dest), 0o755)
	dm := &DeviceMapper{}
	d, err := dm.Clone(ctx, base, dest, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dm.Release(ctx, dest) }()
	f, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Seek(0, io.SeekEnd); size != 8<<20 {
		t.Fatalf("disk of %d bytes, want 8 MiB", size)
	}
	mark := bytes.Repeat([]byte("written past the template "), 100)
	if _, err := f.WriteAt(mark, 6<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// A reboot: the devices and loops go, the COW file stays.
	for _, name := range []string{dmName(dest), extendedName(dest)} {
		if err := devmapper.Remove(name); err != nil {
			t.Fatal(err)
		}
	}
	for _, file := range []string{dest, base} {
		devs, _ := loopdev.Find(file)
		for _, dev := range devs {
			_ = loopdev.Detach(dev)
		}
	}
	if d, err = dm.Reattach(ctx, base, dest, 8<<20); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(mark))
	f, err = os.Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 6<<20); err != nil || !bytes.Equal(got, mark) {
		t.Fatalf("after reattaching: %q %v", got[:32], err)
	}
}

// TestQcow2LayersCopyWhatTheSandboxWrote: a layer holds a disk's writes
// up to the copy and nothing after; disks stacked on it read the template
// under those writes, and write only to themselves.
func TestQcow2LayersCopyWhatTheSandboxWrote(t *testing.T) {
	ctx := context.Background()
	base := template(t, 4<<20)
	dir := t.TempDir()
	src, err := Qcow2{}.Clone(ctx, base, filepath.Join(dir, "src.qcow2"), 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	qemuIO := func(path, cmd string) {
		t.Helper()
		if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, path).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io %s: %v: %s", cmd, err, out)
		}
	}
	qemuIO(src.Path, "write -P 0x11 1M 64k")
	layer := filepath.Join(dir, "layer.qcow2")
	if err := (Qcow2{}).CopyLayer(ctx, src, base, layer); err != nil {
		t.Fatal(err)
	}
	qemuIO(src.Path, "write -P 0x22 2M 64k") // after the copy: not in the layer
	child, err := Qcow2{}.CloneLayer(ctx, layer, filepath.Join(dir, "child.qcow2"), 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(child.Path, "write -P 0x33 3M 64k")
	other, err := Qcow2{}.CloneLayer(ctx, layer, filepath.Join(dir, "other.qcow2"), 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	read := func(path string) []byte {
		t.Helper()
		raw := filepath.Join(dir, "read.raw")
		if out, err := exec.Command("qemu-img", "convert", "-O", "raw", path, raw).CombinedOutput(); err != nil {
			t.Fatalf("read %s: %v: %s", path, err, out)
		}
		data, _ := os.ReadFile(raw)
		return data
	}
	at := func(data []byte, off int) byte { return data[off<<20] }
	c, o := read(child.Path), read(other.Path)
	if len(c) != 8<<20 || at(c, 0) != 0x5a || at(c, 1) != 0x11 || at(c, 2) != 0x5a || at(c, 3) != 0x33 || at(c, 5) != 0 {
		t.Fatalf("child reads %x %x %x %x %x over %d bytes", at(c, 0), at(c, 1), at(c, 2), at(c, 3), at(c, 5), len(c))
	}
	if at(o, 1) != 0x11 || at(o, 3) != 0x5a {
		t.Fatalf("a second disk on the layer reads %x at 1M and %x at 3M", at(o, 1), at(o, 3))
	}
	info, _ := exec.Command("qemu-img", "info", "--output=json", layer).Output()
	if !bytes.Contains(info, []byte(`"backing-filename": "`+base+`"`)) || !bytes.Contains(info, []byte(`"backing-filename-format": "raw"`)) {
		t.Fatalf("layer: %s", info)
	}
	if err := (Qcow2{}).CopyLayer(ctx, Disk{Path: base, Format: "raw"}, base, filepath.Join(dir, "x")); err == nil {
		t.Fatal("a raw disk was copied as a layer")
	}
}
