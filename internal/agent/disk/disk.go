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
	"path/filepath"
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

// Layers is a Cloner that can copy what a sandbox wrote to its disk, at
// one moment, as a layer on the same base (CopyLayer), and stack new disks
// on such a layer (CloneLayer): copying a disk then costs what the sandbox
// wrote, not the whole image.
type Layers interface {
	// CopyLayer copies disk's own data into dest, a layer over base (the
	// file disk was cloned from). disk must not change during the copy.
	CopyLayer(ctx context.Context, disk Disk, base, dest string) error
	// CloneLayer is Clone for a base that CopyLayer made.
	CloneLayer(ctx context.Context, layer, dest string, sizeBytes int64) (Disk, error)
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

var _ Layers = Qcow2{}

// CopyLayer implements Layers: the overlay file is copied and its backing
// file named again, by absolute path and as raw, whatever the copy says
// (a layer never trusts a header a guest-facing VMM last wrote).
func (Qcow2) CopyLayer(ctx context.Context, d Disk, base, dest string) error {
	if d.Format != "qcow2" {
		return fmt.Errorf("copy disk layer: %s is %s, not a qcow2 overlay", d.Path, d.Format)
	}
	if !filepath.IsAbs(base) {
		return fmt.Errorf("copy disk layer: base %q is not an absolute path", base)
	}
	tmp := dest + ".copying"
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", d.Path, tmp).CombinedOutput(); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("copy disk layer %s: %w: %s", d.Path, err, strings.TrimSpace(string(out)))
	}
	if out, err := exec.CommandContext(ctx, "qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", base, tmp).CombinedOutput(); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("copy disk layer %s: %w: %s", d.Path, err, strings.TrimSpace(string(out)))
	}
	if err := os.Rename(tmp, dest); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("copy disk layer: %w", err)
	}
	return nil
}

// CloneLayer implements Layers: an overlay of the layer, which is qcow2.
func (Qcow2) CloneLayer(ctx context.Context, layer, dest string, sizeBytes int64) (Disk, error) {
	if _, err := os.Stat(layer); err != nil {
		return Disk{}, fmt.Errorf("clone disk: %w", err)
	}
	args := []string{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", layer, dest}
	if sizeBytes > 0 {
		args = append(args, strconv.FormatInt(sizeBytes, 10))
	}
	if out, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput(); err != nil {
		_ = os.Remove(dest)
		return Disk{}, fmt.Errorf("create qcow2 overlay of layer %s: %w: %s", layer, err, strings.TrimSpace(string(out)))
	}
	return Disk{Path: dest, Format: "qcow2"}, nil
}

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
