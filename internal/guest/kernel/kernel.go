// Package kernel finds the guest kernel on a host: the highest
// $WRENN_DIR/kernels/vmlinux-<semver>, else a plain vmlinux.
package kernel

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/mod/semver"
)

// Pick returns the kernel in wrennDir/kernels: the highest vmlinux-<semver>,
// else a plain vmlinux.
func Pick(wrennDir string) (string, error) {
	dir := filepath.Join(wrennDir, "kernels")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("find kernel: %w", err)
	}
	var versions []string
	plain := false
	for _, e := range entries {
		name := e.Name()
		if name == "vmlinux" {
			plain = true
			continue
		}
		if v, ok := strings.CutPrefix(name, "vmlinux-"); ok && semver.IsValid("v"+v) {
			versions = append(versions, "v"+v)
		}
	}
	if len(versions) > 0 {
		sort.Slice(versions, func(i, j int) bool { return semver.Compare(versions[i], versions[j]) < 0 })
		return filepath.Join(dir, "vmlinux-"+strings.TrimPrefix(versions[len(versions)-1], "v")), nil
	}
	if plain {
		return filepath.Join(dir, "vmlinux"), nil
	}
	return "", fmt.Errorf("no vmlinux or vmlinux-<semver> in %s: run make kernel", dir)
}
