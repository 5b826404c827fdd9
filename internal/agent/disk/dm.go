package disk

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/wrenn/wrenn/internal/agent/disk/devmapper"
	"github.com/wrenn/wrenn/internal/agent/disk/loopdev"
)

// DeviceMapper gives each sandbox a device-mapper snapshot of its
// template: the template is attached once, read-only, to a loop device
// that every sandbox of that template shares, and each sandbox's writes go
// to its own sparse copy-on-write file on a loop device of its own. This
// is the layout Firecracker hosts use (Firecracker reads no qcow2). A disk
// larger than its template snapshots a linear device that extends the
// template with zeros (the guest grows its file system into it).
//
// The shared loop device is detached when the kernel lists no holder of it
// (/sys/block/loopN/holders) at a release. Every attach, create, reattach
// and release on the host runs under one lock: without it a release
// between another create's attach and its device's creation could detach the
// origin, or hand its loop number to another file. Loop devices and
// device-mapper tables are made through the kernel's ioctls (packages
// loopdev and devmapper), not by running losetup and dmsetup.
type DeviceMapper struct {
	mu sync.Mutex
}

// Name implements Cloner.
func (*DeviceMapper) Name() string { return "dm" }

// Available reports whether this host can create device-mapper devices.
func Available() error {
	if err := devmapper.Available(); err != nil {
		return err
	}
	return loopdev.Available()
}

// dmName names a sandbox's device after its directory (the sandbox id);
// extendedName is the template extended to a larger disk's size.
// (A dot, which no sandbox id holds, keeps the two kinds of names apart.)
func dmName(dest string) string       { return "wrenn-" + filepath.Base(filepath.Dir(dest)) }
func extendedName(dest string) string { return "wrenn.ext-" + filepath.Base(filepath.Dir(dest)) }

// cowSize is a COW file that can hold every chunk of a size-byte disk and
// the snapshot's own metadata (a 4 KiB chunk of exceptions per 256 data
// chunks, and a header): the snapshot never overflows, so a guest that
// rewrites its whole disk never meets an invalidated snapshot. The file
// is sparse: only what the guest writes takes space.
func cowSize(size int64) int64 { return size + size/128 + 1<<20 }

// diskSize is the sandbox disk's size: the template's at least, in whole
// 4 KiB chunks.
func diskSize(baseSize, sizeBytes int64) int64 {
	return (max(baseSize, sizeBytes) + 4095) &^ 4095
}

// Clone implements Cloner.
func (d *DeviceMapper) Clone(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error) {
	if err := Available(); err != nil {
		return Disk{}, err
	}
	fi, err := os.Stat(base)
	if err != nil {
		return Disk{}, fmt.Errorf("clone disk: %w", err)
	}
	size := diskSize(fi.Size(), sizeBytes)
	if err := createSparse(dest, cowSize(size)); err != nil {
		return Disk{}, err
	}
	dsk, err := d.attach(ctx, base, fi.Size(), dest, size, false)
	if err != nil {
		_ = os.Remove(dest)
	}
	return dsk, err
}

// Reattach makes the device of a disk Clone made again from its COW file
// (after a host reboot, or anything else that removed it), keeping what
// the sandbox wrote; a disk whose device is there is left as it is.
func (d *DeviceMapper) Reattach(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error) {
	if err := Available(); err != nil {
		return Disk{}, err
	}
	if _, err := os.Stat(dest); err != nil {
		return Disk{}, fmt.Errorf("reattach disk: its data file is gone: %w", err)
	}
	fi, err := os.Stat(base)
	if err != nil {
		return Disk{}, fmt.Errorf("reattach disk: its template: %w", err)
	}
	return d.attach(ctx, base, fi.Size(), dest, diskSize(fi.Size(), sizeBytes), true)
}

// attach builds the device stack of dest: the shared template loop, the
// extension to size when it is larger, the COW loop and the snapshot,
// reusing whichever parts exist. The "P" snapshot keeps its exceptions in
// the COW file, so attaching an existing file finds the sandbox's writes.
func (d *DeviceMapper) attach(ctx context.Context, base string, baseSize int64, dest string, size int64, reattach bool) (Disk, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if reattach {
		// A disk whose device is there is left as it is.
		if ok, err := devmapper.Exists(dmName(dest)); err != nil {
			return Disk{}, fmt.Errorf("reattach disk: %w", err)
		} else if ok {
			return Disk{Path: devmapper.Path(dmName(dest)), Format: "raw"}, nil
		}
	}
	baseLoop, err := AttachShared(ctx, base)
	if err != nil {
		return Disk{}, err
	}
	origin := baseLoop
	var undo []func()
	fail := func(err error) (Disk, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		_ = DetachIfUnused(ctx, baseLoop)
		return Disk{}, err
	}
	if size > baseSize {
		ext := devmapper.Path(extendedName(dest))
		there, err := devmapper.Exists(extendedName(dest))
		if err != nil {
			return fail(err)
		}
		if !there {
			table := []devmapper.Target{
				{Length: uint64(baseSize / 512), Type: "linear", Params: origin + " 0"},
				{Start: uint64(baseSize / 512), Length: uint64((size - baseSize) / 512), Type: "zero"},
			}
			if _, err := devmapper.Create(extendedName(dest), table); err != nil {
				return fail(err)
			}
			undo = append(undo, func() { _ = devmapper.Remove(extendedName(dest)) })
		}
		origin = ext
	}
	cows, err := loopdev.Find(dest)
	if err != nil {
		return fail(err)
	}
	var cow string
	if len(cows) > 0 {
		cow = cows[0]
	} else {
		if cow, err = loopdev.Attach(dest, false); err != nil {
			return fail(err)
		}
		undo = append(undo, func() { _ = loopdev.Detach(cow) })
	}
	// 512-byte sectors; chunks of 8 sectors (4 KiB).
	table := []devmapper.Target{{Length: uint64(size / 512), Type: "snapshot", Params: origin + " " + cow + " P 8"}}
	path, err := devmapper.Create(dmName(dest), table)
	if err != nil {
		return fail(err)
	}
	return Disk{Path: path, Format: "raw"}, nil
}

// Release implements Cloner: remove the snapshot and any extension, detach
// the COW loop, detach the template's loop if no other sandbox uses it,
// delete the file.
func (d *DeviceMapper) Release(ctx context.Context, dest string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, name := range []string{dmName(dest), extendedName(dest)} {
		there, err := devmapper.Exists(name)
		if err != nil {
			return err // never delete the COW file under a device still there
		}
		if !there {
			continue
		}
		deps, err := devmapper.Deps(name)
		if err != nil {
			return err
		}
		if err := devmapper.Remove(name); err != nil {
			return err
		}
		for _, dev := range deps {
			if !strings.HasPrefix(dev, "loop") {
				continue // the extension, removed next
			}
			if err := DetachIfUnused(ctx, "/dev/"+dev); err != nil {
				return err
			}
		}
	}
	// A COW loop whose dm device is already gone.
	if _, err := os.Stat(dest); err == nil {
		devs, _ := loopdev.Find(dest)
		for _, d := range devs {
			_ = loopdev.Detach(d)
		}
	}
	return removeFile(dest)
}

// AttachShared returns the read-only loop device of base, attaching it if
// no read-only loop device for it exists yet.
func AttachShared(_ context.Context, base string) (string, error) {
	devs, err := loopdev.Find(base)
	if err != nil {
		return "", err
	}
	for _, d := range devs {
		if loopdev.ReadOnly(d) {
			return d, nil
		}
	}
	return loopdev.Attach(base, true)
}

// DetachIfUnused detaches a loop device nothing holds any more: the
// kernel's list of its holders is the count of sandboxes using it, and
// it survives an agent restart, as a count of our own would not.
func DetachIfUnused(_ context.Context, dev string) error {
	n, err := loopdev.Holders(dev)
	if err != nil {
		return err
	}
	if n != 0 {
		return nil // in use, or already detached (-1)
	}
	return loopdev.Detach(dev)
}

func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("create COW file: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		_ = os.Remove(path)
		return fmt.Errorf("create COW file: %w", err)
	}
	return f.Close()
}

// Orphans lists the sandbox ids of wrenn device-mapper devices on the host,
// so the agent can release those no sandbox owns.
func Orphans(_ context.Context) ([]string, error) {
	if Available() != nil {
		return nil, nil
	}
	names, err := devmapper.Names()
	if err != nil {
		return nil, fmt.Errorf("list device-mapper devices: %w", err)
	}
	var ids []string
	for _, n := range names {
		if id, ok := strings.CutPrefix(n, "wrenn-"); ok {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
