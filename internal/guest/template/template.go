// Package template stores the base images sandboxes boot from:
// $WRENN_DIR/images/<name>/rootfs.ext4 with a metadata.json beside it.
package template

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotFound means no template has that name.
var ErrNotFound = errors.New("template not found")

var validName = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidateName rejects names that are not safe as a directory name.
func ValidateName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("template name %q: use 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", name)
	}
	return nil
}

// Metadata describes one template.
type Metadata struct {
	Name        string    `json:"name"`
	SizeBytes   int64     `json:"size_bytes"` // the image file's size (the guest's disk size)
	Created     time.Time `json:"created"`
	Parent      string    `json:"parent,omitempty"` // template it was derived from
	Source      string    `json:"source"`           // how it was made: debootstrap, docker, import, flatten
	EnvdVersion string    `json:"envd_version,omitempty"`
	SHA256      string    `json:"sha256"`
	// Ephemeral marks a fork's hidden template: made on this host for the
	// sandboxes of one fork and deleted with the last; not checksummed.
	Ephemeral bool `json:"ephemeral,omitempty"`
	// Layer marks an image that is a qcow2 layer on Parent's disk (what a
	// forked sandbox had written), not a whole one: new disks stack on it
	// with the disk driver's layers, and SizeBytes is the layer's.
	Layer bool `json:"layer,omitempty"`
	// Memory is set when the template also holds a running VM's memory:
	// sandboxes that fit it start by restoring it instead of booting.
	Memory *Memory `json:"memory,omitempty"`
}

// Memory describes a template's memory snapshot: the machine it was taken
// from, which a sandbox must match to start from it.
type Memory struct {
	VMM       string    `json:"vmm"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memory_mib"`
	DiskMiB   int       `json:"disk_mib"`
	Kernel    string    `json:"kernel"` // the kernel file's name under $WRENN_DIR/kernels
	MAC       string    `json:"mac"`
	SizeBytes int64     `json:"size_bytes"` // on the host: RAM file and device state
	Created   time.Time `json:"created"`
	// Disk names the disk saved with the memory, under MemoryDir, when it
	// is not the template's image (a shipped image warmed by the agent).
	Disk string `json:"disk,omitempty"`
}

// MemoryDir is where a template's memory snapshot lives.
func (s Store) MemoryDir(name string) string { return filepath.Join(s.Dir, name, "memory") }

// SetMemory records that the memory snapshot under MemoryDir is complete
// (mem set) or gone (nil).
func (s Store) SetMemory(name string, mem *Memory) error {
	meta, err := s.Get(name)
	if err != nil {
		return err
	}
	meta.Memory = mem
	if mem == nil {
		if err := os.RemoveAll(s.MemoryDir(name)); err != nil {
			return fmt.Errorf("template %s: remove memory snapshot: %w", name, err)
		}
	}
	if err := writeJSON(s.metaPath(name), meta); err != nil {
		return fmt.Errorf("template %s: %w", name, err)
	}
	return nil
}

// Store is the images directory of one host.
type Store struct {
	Dir string // $WRENN_DIR/images
}

// RootfsPath is where a template's image lives.
func (s Store) RootfsPath(name string) string { return filepath.Join(s.Dir, name, "rootfs.ext4") }

func (s Store) metaPath(name string) string { return filepath.Join(s.Dir, name, "metadata.json") }

// Install copies the image at from into the store as name, replacing any
// template of that name only once the copy is complete.
func (s Store) Install(ctx context.Context, name, from string, meta Metadata) (Metadata, error) {
	return s.install(ctx, name, meta, func(tmp string) error { return SparseCopy(ctx, from, tmp) })
}

// Adopt moves the image at from (a file the caller made and gives up,
// such as a flattened sandbox disk) into the store as name: no copy when
// it is on the store's file system.
func (s Store) Adopt(ctx context.Context, name, from string, meta Metadata) (Metadata, error) {
	return s.install(ctx, name, meta, func(tmp string) error {
		if err := os.Rename(from, tmp); err == nil {
			return nil
		}
		if err := SparseCopy(ctx, from, tmp); err != nil {
			return err
		}
		return os.Remove(from)
	})
}

func (s Store) install(ctx context.Context, name string, meta Metadata, place func(tmp string) error) (Metadata, error) {
	if err := ValidateName(name); err != nil {
		return Metadata{}, err
	}
	dir := filepath.Join(s.Dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Metadata{}, fmt.Errorf("install %s: %w", name, err)
	}
	// A memory snapshot belongs to the image it was taken with.
	if err := os.RemoveAll(s.MemoryDir(name)); err != nil {
		return Metadata{}, fmt.Errorf("install %s: %w", name, err)
	}
	meta.Memory = nil
	tmp := filepath.Join(dir, ".rootfs.ext4.installing")
	if err := place(tmp); err != nil {
		return Metadata{}, fmt.Errorf("install %s: %w", name, err)
	}
	sum := ""
	if !meta.Ephemeral {
		var err error
		if sum, err = Checksum(tmp); err != nil {
			_ = os.Remove(tmp)
			return Metadata{}, fmt.Errorf("install %s: %w", name, err)
		}
	}
	fi, err := os.Stat(tmp)
	if err != nil {
		_ = os.Remove(tmp)
		return Metadata{}, fmt.Errorf("install %s: %w", name, err)
	}
	meta.Name, meta.SHA256, meta.SizeBytes = name, sum, fi.Size()
	if meta.Created.IsZero() {
		meta.Created = time.Now().UTC()
	}
	// Image first, then metadata: a reader never sees metadata that
	// describes an image that is not there yet.
	if err := os.Rename(tmp, s.RootfsPath(name)); err != nil {
		_ = os.Remove(tmp)
		return Metadata{}, fmt.Errorf("install %s: %w", name, err)
	}
	if err := writeJSON(s.metaPath(name), meta); err != nil {
		return Metadata{}, fmt.Errorf("install %s: %w", name, err)
	}
	return meta, nil
}

// Get reads a template's metadata.
func (s Store) Get(name string) (Metadata, error) {
	if err := ValidateName(name); err != nil {
		return Metadata{}, err
	}
	data, err := os.ReadFile(s.metaPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return Metadata{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if err != nil {
		return Metadata{}, fmt.Errorf("read template %s: %w", name, err)
	}
	var m Metadata
	if err := json.Unmarshal(data, &m); err != nil {
		return Metadata{}, fmt.Errorf("template %s has corrupt metadata: %w", name, err)
	}
	if _, err := os.Stat(s.RootfsPath(name)); err != nil {
		return Metadata{}, fmt.Errorf("template %s: image missing: %w", name, err)
	}
	return m, nil
}

// List returns every template, by name.
func (s Store) List() ([]Metadata, error) {
	entries, err := os.ReadDir(s.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list templates: %w", err)
	}
	var out []Metadata
	for _, e := range entries {
		// Stat, not the entry's own type: a template directory may be a symlink.
		if fi, err := os.Stat(filepath.Join(s.Dir, e.Name())); err != nil || !fi.IsDir() || ValidateName(e.Name()) != nil {
			continue
		}
		m, err := s.Get(e.Name())
		if err != nil {
			continue // half-installed or foreign directory
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Delete removes a template.
func (s Store) Delete(name string) error {
	if _, err := s.Get(name); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(s.Dir, name)); err != nil {
		return fmt.Errorf("delete template %s: %w", name, err)
	}
	return nil
}

// Checksum returns the hex SHA-256 of a file, streaming it. The holes of
// a sparse file (most of a disk image) are hashed as the zeros they read
// as, without reading them.
func Checksum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("checksum: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("checksum: %w", err)
	}
	h := sha256.New()
	size := fi.Size()
	zeros := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			data = size // ENXIO: only a hole is left
		}
		for hole := data - off; hole > 0; { // zeros up to the next data
			n := min(hole, int64(len(zeros)))
			h.Write(zeros[:n])
			hole -= n
		}
		if data >= size {
			break
		}
		end, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			end = size
		}
		if _, err := io.Copy(h, io.NewSectionReader(f, data, end-data)); err != nil {
			return "", fmt.Errorf("checksum %s: %w", path, err)
		}
		off = end
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// SparseCopy copies a file keeping its holes, so a mostly empty disk image
// stays cheap on disk.
func SparseCopy(ctx context.Context, from, to string) error {
	out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", from, to).CombinedOutput()
	if err != nil {
		return fmt.Errorf("copy %s to %s: %w: %s", from, to, err, out)
	}
	return nil
}

// Flatten writes a standalone raw image from a copy-on-write child: a qcow2
// overlay (its backing chain is read through) or a plain sparse copy.
// format names the child's format ("qcow2" or "raw"; "" lets qemu-img
// guess). The child may be open in a paused VM: it is read with -U.
func Flatten(ctx context.Context, child, format, dest string) error {
	tmp := dest + ".flattening"
	args := []string{"convert", "-U", "-O", "raw", "-S", "4k"}
	if format != "" {
		args = append(args, "-f", format)
	}
	out, err := exec.CommandContext(ctx, "qemu-img", append(args, child, tmp)...).CombinedOutput()
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("flatten %s: %w: %s", child, err, out)
	}
	if err := os.Rename(tmp, dest); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("flatten %s: %w", child, err)
	}
	return nil
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
