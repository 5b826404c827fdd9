// Package guestimages finds the guest kernel and minimal image that
// `make images` builds, for tests that boot real VMs.
package guestimages

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/wrenn/wrenn/internal/guest/kernel"
)

// Require returns WRENN_DIR (default /var/lib/wrenn), its kernel and its
// minimal rootfs. Missing images skip the test, except under `make test`,
// which sets WRENN_REQUIRE_IMAGES=1 so that they fail it instead.
func Require(t testing.TB) (wrennDir, kernelPath, rootfs string) {
	t.Helper()
	wrennDir = os.Getenv("WRENN_DIR")
	if wrennDir == "" {
		wrennDir = "/var/lib/wrenn"
	}
	kernelPath, err := kernel.Pick(wrennDir)
	rootfs = filepath.Join(wrennDir, "images/minimal/rootfs.ext4")
	if err == nil {
		_, err = os.Stat(rootfs)
	}
	if err != nil {
		if os.Getenv("WRENN_REQUIRE_IMAGES") == "1" {
			t.Fatalf("guest images missing (%v); `make images` builds them", err)
		}
		t.Skipf("guest images missing (%v); run `make images` or `make test`", err)
	}
	return wrennDir, kernelPath, rootfs
}

// AgentDir returns a fresh WRENN_DIR for a test's own agent: the system's
// kernels and shipped images (minimal, base, code-runner-beta) are shared (read only, by
// symlink); templates the test makes stay in the new directory.
func AgentDir(t testing.TB) string {
	t.Helper()
	return AgentDirIn(t, t.TempDir())
}

// AgentDirIn is AgentDir on an empty directory the caller chose (a small
// file system, for instance).
func AgentDirIn(t testing.TB, dir string) string {
	t.Helper()
	system, _, _ := Require(t)
	if err := os.Symlink(filepath.Join(system, "kernels"), filepath.Join(dir, "kernels")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range ShippedImages {
		src := filepath.Join(system, "images", name)
		if _, err := os.Stat(src); err != nil {
			if name == "minimal" || os.Getenv("WRENN_REQUIRE_IMAGES") == "1" {
				t.Fatalf("guest image %s missing (%v); `make images` builds it", name, err)
			}
			continue
		}
		if err := os.Symlink(src, filepath.Join(dir, "images", name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// ShippedImages are the images `make images` installs on every host.
var ShippedImages = []string{"minimal", "base", "code-runner-beta"}
