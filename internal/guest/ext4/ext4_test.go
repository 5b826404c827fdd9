package ext4

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestFromDirGrowShrink(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	_ = os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
	_ = os.WriteFile(filepath.Join(tree, "etc/motd"), []byte("hello wrenn\n"), 0o644)
	img := filepath.Join(dir, "fs.ext4")

	if err := FromDir(ctx, tree, img, 64<<20, "rootfs"); err != nil {
		t.Fatal(err)
	}
	got, err := ReadFile(ctx, img, "/etc/motd")
	if err != nil || string(got) != "hello wrenn\n" {
		t.Fatalf("read back %q, %v", got, err)
	}
	if _, err := ReadFile(ctx, img, "/etc/missing"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}

	if err := Grow(ctx, img, 128<<20); err != nil {
		t.Fatal(err)
	}
	blocks, bs, err := Geometry(ctx, img)
	if err != nil || blocks*bs != 128<<20 {
		t.Fatalf("after grow: %d x %d, %v", blocks, bs, err)
	}
	if err := Grow(ctx, img, 1<<20); err == nil {
		t.Fatal("growing to a smaller size succeeded")
	}

	if err := Shrink(ctx, img, 8<<20); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(img)
	if fi.Size() >= 64<<20 || fi.Size() < 8<<20 {
		t.Fatalf("after shrink the image is %d bytes", fi.Size())
	}
	if got, err := ReadFile(ctx, img, "/etc/motd"); err != nil || string(got) != "hello wrenn\n" {
		t.Fatalf("content lost in shrink: %q, %v", got, err)
	}
	if err := FromDir(ctx, tree, img, 1<<20, ""); err == nil {
		t.Fatal("a 1 MiB image was accepted")
	}
}
