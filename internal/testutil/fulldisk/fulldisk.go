// Package fulldisk gives tests a small real file system they can fill to
// the last block, for the full-disk fault under WRENN_DIR.
package fulldisk

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// Mount mounts a tmpfs of sizeMiB on a new directory and unmounts it when
// the test ends (after the cleanups registered later, which run first).
func Mount(t testing.TB, sizeMiB int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a small file system needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+strconv.Itoa(sizeMiB)+"m,mode=0755", "wrenn-fulldisk", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

// Fill takes every free byte of the file system under dir and returns the
// file that holds them (remove it to free the space). Running sandboxes
// write meanwhile, so it takes space in shrinking pieces until not even a
// page is left.
func Fill(t testing.TB, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size int64
	for chunk := int64(64 << 20); chunk >= 4096; {
		err := unix.Fallocate(int(f.Fd()), 0, size, chunk)
		switch {
		case err == nil:
			size += chunk
		case errors.Is(err, unix.ENOSPC):
			chunk /= 2
		default:
			t.Fatalf("fill: %v", err)
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Bavail != 0 {
		t.Fatalf("disk not full: %d blocks free (%v)", st.Bavail, err)
	}
	t.Logf("filled %d MiB", size>>20)
	return path
}
