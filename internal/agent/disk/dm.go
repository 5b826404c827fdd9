package disk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
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
// between another create's attach and its dmsetup create could detach the
// origin, or let losetup --find hand its number to another file.
type DeviceMapper struct {
	mu sync.Mutex
}

// Name implements Cloner.
func (*DeviceMapper) Name() string { return "dm" }

// Available reports whether this host can create device-mapper devices.
func Available() error {
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		return fmt.Errorf("device-mapper is not available (no /dev/mapper/control): %w", err)
	}
	if _, err := exec.LookPath("dmsetup"); err != nil {
		return fmt.Errorf("device-mapper: %w (apt-get install dmsetup)", err)
	}
	return nil
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
	dsk, err := d.attach(ctx, base, fi.Size(), dest, size)
	if err != nil {
		_ = os.Remove(dest)
	}
	return dsk, err
}

// Reattach makes the device of a disk Clone made again from its COW file
// (after a host reboot, or anything else that removed it), keeping what
// the sandbox wrote; a disk whose device is there is left as it is.
func (d *DeviceMapper) Reattach(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error) {
	dsk := Disk{Path: "/dev/mapper/" + dmName(dest), Format: "raw"}
	if _, err := os.Stat(dsk.Path); err == nil {
		return dsk, nil
	}
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
	return d.attach(ctx, base, fi.Size(), dest, diskSize(fi.Size(), sizeBytes))
}

// attach builds the device stack of dest: the shared template loop, the
// extension to size when it is larger, the COW loop and the snapshot,
// reusing whichever parts exist. The "P" snapshot keeps its exceptions in
// the COW file, so attaching an existing file finds the sandbox's writes.
func (d *DeviceMapper) attach(ctx context.Context, base string, baseSize int64, dest string, size int64) (Disk, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
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
		ext := "/dev/mapper/" + extendedName(dest)
		if _, err := os.Stat(ext); err != nil {
			table := fmt.Sprintf("0 %d linear %s 0\n%d %d zero", baseSize/512, origin, baseSize/512, (size-baseSize)/512)
			if err := dmcreate(ctx, extendedName(dest), table); err != nil {
				return fail(err)
			}
			undo = append(undo, func() { _ = dmsetup(ctx, "remove", "--retry", extendedName(dest)) })
		}
		origin = ext
	}
	cows, err := loopsFor(ctx, dest)
	if err != nil {
		return fail(err)
	}
	var cow string
	if len(cows) > 0 {
		cow = cows[0]
	} else {
		if cow, err = losetup(ctx, "--find", "--show", dest); err != nil {
			return fail(err)
		}
		undo = append(undo, func() { _, _ = losetup(ctx, "--detach", cow) })
	}
	// 512-byte sectors; chunks of 8 sectors (4 KiB).
	table := fmt.Sprintf("0 %d snapshot %s %s P 8", size/512, origin, cow)
	if err := dmcreate(ctx, dmName(dest), table); err != nil {
		return fail(err)
	}
	return Disk{Path: "/dev/mapper/" + dmName(dest), Format: "raw"}, nil
}

// dmcreate makes device name from table, given on standard input (the
// command line takes one-line tables only).
func dmcreate(ctx context.Context, name, table string) error {
	cmd := exec.CommandContext(ctx, "dmsetup", "create", name)
	cmd.Stdin = strings.NewReader(table + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("dmsetup create %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func dmsetup(ctx context.Context, args ...string) error {
	if out, err := exec.CommandContext(ctx, "dmsetup", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("dmsetup %s: %w: %s", strings.Join(args[:min(len(args), 2)], " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Release implements Cloner: remove the snapshot and any extension, detach
// the COW loop, detach the template's loop if no other sandbox uses it,
// delete the file.
func (d *DeviceMapper) Release(ctx context.Context, dest string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, name := range []string{dmName(dest), extendedName(dest)} {
		if _, err := os.Stat("/dev/mapper/" + name); err != nil {
			continue
		}
		deps, _ := exec.CommandContext(ctx, "dmsetup", "deps", "-o", "devname", name).Output()
		if err := dmsetup(ctx, "remove", "--retry", name); err != nil {
			return err
		}
		for _, dev := range depNames(string(deps)) {
			if !strings.HasPrefix(dev, "loop") {
				continue // the extension, removed next
			}
			if err := DetachIfUnused(ctx, "/dev/"+dev); err != nil {
				return err
			}
		}
	}
	// A COW loop whose dm device is already gone.
	if devs, _ := loopsFor(ctx, dest); len(devs) > 0 {
		for _, d := range devs {
			_, _ = losetup(ctx, "--detach", d)
		}
	}
	return removeFile(dest)
}

// depNames parses `dmsetup deps -o devname` output: "2 dependencies : (loop1) (loop0)".
func depNames(out string) []string {
	var names []string
	for _, f := range strings.Fields(out) {
		if strings.HasPrefix(f, "(") && strings.HasSuffix(f, ")") {
			names = append(names, strings.Trim(f, "()"))
		}
	}
	return names
}

// AttachShared returns the read-only loop device of base, attaching it if
// no read-only loop device for it exists yet.
func AttachShared(ctx context.Context, base string) (string, error) {
	devs, err := loopsFor(ctx, base)
	if err != nil {
		return "", err
	}
	for _, d := range devs {
		ro, err := os.ReadFile("/sys/block/" + filepath.Base(d) + "/ro")
		if err == nil && strings.TrimSpace(string(ro)) == "1" {
			return d, nil
		}
	}
	return losetup(ctx, "--find", "--show", "--read-only", base)
}

// DetachIfUnused detaches a loop device nothing holds any more.
func DetachIfUnused(ctx context.Context, dev string) error {
	holders, err := os.ReadDir("/sys/block/" + filepath.Base(dev) + "/holders")
	if errors.Is(err, os.ErrNotExist) {
		return nil // already detached
	}
	if err != nil {
		return err
	}
	if len(holders) > 0 {
		return nil
	}
	if _, err := losetup(ctx, "--detach", dev); err != nil && !strings.Contains(err.Error(), "No such device") {
		return err
	}
	return nil
}

// loopsFor lists the loop devices backed by file.
func loopsFor(ctx context.Context, file string) ([]string, error) {
	out, err := losetup(ctx, "--noheadings", "--output", "NAME", "--associated", file)
	if err != nil {
		return nil, err
	}
	return strings.Fields(out), nil
}

func losetup(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "losetup", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("losetup %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
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
func Orphans(ctx context.Context) ([]string, error) {
	if Available() != nil {
		return nil, nil
	}
	out, err := exec.CommandContext(ctx, "dmsetup", "ls").Output()
	if err != nil {
		return nil, fmt.Errorf("dmsetup ls: %w", err)
	}
	var ids []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "wrenn-") {
			ids = append(ids, strings.TrimPrefix(f[0], "wrenn-"))
		}
	}
	return ids, nil
}
