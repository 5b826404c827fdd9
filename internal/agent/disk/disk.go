// Package disk gives each sandbox its own root disk, a copy-on-write child
// of a template that is never written: a qcow2 overlay for QEMU, or a
// sparse copy where overlays do not fit. (Device-mapper snapshots for
// Firecracker live in their own driver.)
package disk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Disk is what the VMM opens.
type Disk struct {
	Path   string // a file, or a block device such as /dev/mapper/wrenn-<id>
	Format string // "qcow2" or "raw"
}

// Cloner makes sandbox disks from templates.
type Cloner interface {
	// Name is "qcow2", "copy" or "dm".
	Name() string
	// Clone makes a disk the sandbox may write, backed by base, keeping its
	// own data in the file dest. sizeBytes, when larger than base, enlarges
	// the disk (the guest grows its file system at boot).
	Clone(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error)
	// Release undoes Clone; releasing a disk that is gone is not an error.
	Release(ctx context.Context, dest string) error
}

// Reattacher is a Cloner whose disks live partly outside their file (a
// device-mapper device a reboot removes): Reattach makes such a disk whole
// again from what Clone kept in dest, before a VM opens it.
type Reattacher interface {
	Reattach(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error)
}

// Qcow2 makes a qcow2 overlay whose backing file is the template. Only
// the blocks the sandbox writes take space; creation takes milliseconds.
type Qcow2 struct{}

// Name implements Cloner.
func (Qcow2) Name() string { return "qcow2" }

// Clone implements Cloner.
func (Qcow2) Clone(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error) {
	fi, err := os.Stat(base)
	if err != nil {
		return Disk{}, fmt.Errorf("clone disk: %w", err)
	}
	args := []string{"create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, dest}
	if sizeBytes > fi.Size() {
		args = append(args, strconv.FormatInt(sizeBytes, 10))
	}
	out, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput()
	if err != nil {
		_ = os.Remove(dest)
		return Disk{}, fmt.Errorf("create qcow2 overlay of %s: %w: %s", base, err, strings.TrimSpace(string(out)))
	}
	return Disk{Path: dest, Format: "qcow2"}, nil
}

// Release implements Cloner.
func (Qcow2) Release(_ context.Context, dest string) error { return removeFile(dest) }

func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove disk: %w", err)
	}
	return nil
}

// SparseCopy copies the template, keeping holes (and sharing blocks where
// the file system supports reflinks). Any VMM can use the result.
type SparseCopy struct{}

// Name implements Cloner.
func (SparseCopy) Name() string { return "copy" }

// Clone implements Cloner.
func (SparseCopy) Clone(ctx context.Context, base, dest string, sizeBytes int64) (Disk, error) {
	out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", base, dest).CombinedOutput()
	if err != nil {
		_ = os.Remove(dest)
		return Disk{}, fmt.Errorf("copy %s: %w: %s", base, err, strings.TrimSpace(string(out)))
	}
	if fi, err := os.Stat(dest); err == nil && sizeBytes > fi.Size() {
		if err := os.Truncate(dest, sizeBytes); err != nil {
			_ = os.Remove(dest)
			return Disk{}, fmt.Errorf("enlarge disk: %w", err)
		}
	}
	return Disk{Path: dest, Format: "raw"}, nil
}

// Release implements Cloner.
func (SparseCopy) Release(_ context.Context, dest string) error { return removeFile(dest) }

// ForName returns the cloner with that name.
func ForName(name string) (Cloner, error) {
	switch name {
	case "qcow2", "":
		return Qcow2{}, nil
	case "copy":
		return SparseCopy{}, nil
	case "dm":
		return &DeviceMapper{}, nil
	default:
		return nil, errors.New("unknown disk driver " + name + " (qcow2, copy, dm)")
	}
}
