// Package ext4 makes, grows, shrinks and inspects ext4 image files with
// e2fsprogs, without mounting them (so no loop devices and no privileges
// beyond owning the files are needed).
package ext4

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// FromDir writes an ext4 image of sizeBytes holding the tree at dir, with
// the tree's owners and permissions (run as root to keep them).
func FromDir(ctx context.Context, dir, image string, sizeBytes int64, label string) error {
	if sizeBytes < 8<<20 {
		return fmt.Errorf("image size %d bytes is below the 8 MiB minimum", sizeBytes)
	}
	args := []string{"-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", dir}
	if label != "" {
		args = append(args, "-L", label)
	}
	args = append(args, image, strconv.FormatInt(sizeBytes/1024, 10)+"k")
	if err := run(ctx, "mkfs.ext4", args...); err != nil {
		return fmt.Errorf("make ext4 from %s: %w", dir, err)
	}
	return nil
}

// Check runs a forced, non-interactive file-system check and repairs what
// it safely can; resize2fs refuses images that were not checked.
func Check(ctx context.Context, image string) error {
	cmd := exec.CommandContext(ctx, "e2fsck", "-f", "-y", image)
	out, err := cmd.CombinedOutput()
	if err != nil {
		// Exit status 1 means errors were corrected, which is fine.
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 1 {
			return nil
		}
		return fmt.Errorf("e2fsck %s: %w: %s", image, err, lastLines(out))
	}
	return nil
}

// Grow enlarges the image file and its file system to sizeBytes.
func Grow(ctx context.Context, image string, sizeBytes int64) error {
	fi, err := os.Stat(image)
	if err != nil {
		return fmt.Errorf("grow: %w", err)
	}
	if sizeBytes < fi.Size() {
		return fmt.Errorf("grow %s: %d bytes is smaller than its current %d", image, sizeBytes, fi.Size())
	}
	if err := Check(ctx, image); err != nil {
		return err
	}
	if err := os.Truncate(image, sizeBytes); err != nil {
		return fmt.Errorf("grow %s: %w", image, err)
	}
	if err := run(ctx, "resize2fs", image); err != nil {
		return fmt.Errorf("grow %s: %w", image, err)
	}
	return nil
}

// Shrink reduces the file system to its minimum plus headroomBytes and
// truncates the file to match.
func Shrink(ctx context.Context, image string, headroomBytes int64) error {
	if err := Check(ctx, image); err != nil {
		return err
	}
	if err := run(ctx, "resize2fs", "-M", image); err != nil {
		return fmt.Errorf("shrink %s: %w", image, err)
	}
	blocks, blockSize, err := Geometry(ctx, image)
	if err != nil {
		return err
	}
	minimum := blocks * blockSize
	if err := os.Truncate(image, minimum); err != nil {
		return fmt.Errorf("shrink %s: %w", image, err)
	}
	if headroomBytes > 0 {
		return Grow(ctx, image, minimum+headroomBytes)
	}
	return nil
}

// Geometry reads the file system's block count and block size.
func Geometry(ctx context.Context, image string) (blocks, blockSize int64, err error) {
	out, err := exec.CommandContext(ctx, "dumpe2fs", "-h", image).Output()
	if err != nil {
		return 0, 0, fmt.Errorf("dumpe2fs %s: %w", image, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, perr := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
		switch strings.TrimSpace(key) {
		case "Block count":
			blocks, err = n, perr
		case "Block size":
			blockSize, err = n, perr
		}
		if err != nil {
			return 0, 0, fmt.Errorf("dumpe2fs %s: parse %q: %w", image, line, err)
		}
	}
	if blocks == 0 || blockSize == 0 {
		return 0, 0, fmt.Errorf("dumpe2fs %s: no block count or size", image)
	}
	return blocks, blockSize, nil
}

// ReadFile reads one file out of an image with debugfs (no mount).
func ReadFile(ctx context.Context, image, path string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "debugfs", "-R", "cat "+path, image)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("debugfs cat %s: %w: %s", path, err, lastLines(stderr.Bytes()))
	}
	// debugfs reports a missing file on stderr but still exits 0.
	if strings.Contains(stderr.String(), "File not found") {
		return nil, fmt.Errorf("%s: %w", path, os.ErrNotExist)
	}
	return stdout.Bytes(), nil
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, lastLines(out))
	}
	return nil
}

func lastLines(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}
