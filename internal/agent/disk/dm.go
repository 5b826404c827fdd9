package disk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// DeviceMapper gives each sandbox a device-mapper snapshot of its
// template: the template is attached once, read-only, to a loop device
// that every sandbox of that template shares, and each sandbox's writes go
// to its own sparse copy-on-write file on a loop device of its own. This
// is the layout Firecracker hosts use (Firecracker reads no qcow2).
//
// The shared loop device needs no reference count file: the kernel lists
// the dm devices that use it under /sys/block/loopN/holders, and it is
// detached when the last one is gone.
type DeviceMapper struct{}

// Name implements Cloner.
func (DeviceMapper) Name() string { return "dm" }

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

// dmName names a sandbox's device after its directory (the sandbox id).
func dmName(dest string) string { return "wrenn-" + filepath.Base(filepath.Dir(dest)) }

// Clone implements Cloner. The COW file gets the template's size: a dm
// snapshot cannot be larger than its origin.
func (DeviceMapper) Clone(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error) {
	if err := Available(); err != nil {
		return Disk{}, err
	}
	fi, err := os.Stat(base)
	if err != nil {
		return Disk{}, fmt.Errorf("clone disk: %w", err)
	}
	if sizeBytes > fi.Size() {
		return Disk{}, fmt.Errorf("device-mapper disks cannot be larger than their template (%d bytes); use the qcow2 or copy disk driver for bigger disks", fi.Size())
	}
	origin, err := AttachShared(ctx, base)
	if err != nil {
		return Disk{}, err
	}
	release := func() { _ = DetachIfUnused(ctx, origin) }
	if err := createSparse(dest, fi.Size()); err != nil {
		release()
		return Disk{}, err
	}
	cow, err := losetup(ctx, "--find", "--show", dest)
	if err != nil {
		release()
		_ = os.Remove(dest)
		return Disk{}, err
	}
	// 512-byte sectors; "P" keeps the snapshot across reboots, chunks of 8 sectors (4 KiB).
	table := fmt.Sprintf("0 %d snapshot %s %s P 8", fi.Size()/512, origin, cow)
	if out, err := exec.CommandContext(ctx, "dmsetup", "create", dmName(dest), "--table", table).CombinedOutput(); err != nil {
		_, _ = losetup(ctx, "--detach", cow)
		release()
		_ = os.Remove(dest)
		return Disk{}, fmt.Errorf("dmsetup create %s: %w: %s", dmName(dest), err, strings.TrimSpace(string(out)))
	}
	return Disk{Path: "/dev/mapper/" + dmName(dest), Format: "raw"}, nil
}

// Release implements Cloner: remove the dm device, detach the COW loop,
// detach the template's loop if no other sandbox uses it, delete the file.
func (DeviceMapper) Release(ctx context.Context, dest string) error {
	name := dmName(dest)
	if _, err := os.Stat("/dev/mapper/" + name); err == nil {
		deps, _ := exec.CommandContext(ctx, "dmsetup", "deps", "-o", "devname", name).Output()
		if out, err := exec.CommandContext(ctx, "dmsetup", "remove", "--retry", name).CombinedOutput(); err != nil {
			return fmt.Errorf("dmsetup remove %s: %w: %s", name, err, strings.TrimSpace(string(out)))
		}
		for _, dev := range depNames(string(deps)) {
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
