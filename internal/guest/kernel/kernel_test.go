package kernel

import (
	"os"
	"path/filepath"
	"testing"
)

func TestKernelPicksHighestSemver(t *testing.T) {
	dir := t.TempDir()
	_ = os.MkdirAll(filepath.Join(dir, "kernels"), 0o755)
	if _, err := Pick(dir); err == nil {
		t.Fatal("empty kernels dir accepted")
	}
	for _, name := range []string{"vmlinux", "vmlinux-6.1.9", "vmlinux-6.1.10", "vmlinux-5.10.200", "vmlinux-notaversion"} {
		_ = os.WriteFile(filepath.Join(dir, "kernels", name), nil, 0o644)
	}
	got, err := Pick(dir)
	if err != nil || filepath.Base(got) != "vmlinux-6.1.10" {
		t.Fatalf("picked %s, %v", got, err)
	}
	_ = os.Remove(filepath.Join(dir, "kernels", "vmlinux-6.1.10"))
	_ = os.Remove(filepath.Join(dir, "kernels", "vmlinux-6.1.9"))
	_ = os.Remove(filepath.Join(dir, "kernels", "vmlinux-5.10.200"))
	if got, _ := Pick(dir); filepath.Base(got) != "vmlinux" {
		t.Fatalf("plain vmlinux not picked: %s", got)
	}
}
