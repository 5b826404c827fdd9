package template

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestStoreLifecycle(t *testing.T) {
	ctx := context.Background()
	s := Store{Dir: filepath.Join(t.TempDir(), "images")}
	src := filepath.Join(t.TempDir(), "src.ext4")
	if err := os.WriteFile(src, bytes.Repeat([]byte{1}, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := s.Install(ctx, "base", src, Metadata{Source: "test", EnvdVersion: "v1"})
	if err != nil {
		t.Fatal(err)
	}
	if m.SizeBytes != 4096 || len(m.SHA256) != 64 || m.Created.IsZero() {
		t.Fatalf("%+v", m)
	}
	got, err := s.Get("base")
	if err != nil || got.SHA256 != m.SHA256 || got.EnvdVersion != "v1" {
		t.Fatalf("get: %+v %v", got, err)
	}
	if sum, _ := Checksum(s.RootfsPath("base")); sum != m.SHA256 {
		t.Fatal("checksum mismatch")
	}
	if _, err := s.Install(ctx, "child", src, Metadata{Parent: "base"}); err != nil {
		t.Fatal(err)
	}
	all, err := s.List()
	if err != nil || len(all) != 2 || all[0].Name != "base" || all[1].Parent != "base" {
		t.Fatalf("list: %+v %v", all, err)
	}
	// A template directory may be a symlink to one kept elsewhere.
	if err := os.Symlink(filepath.Join(s.Dir, "base"), filepath.Join(s.Dir, "linked")); err != nil {
		t.Fatal(err)
	}
	if all, _ := s.List(); len(all) != 3 {
		t.Fatalf("symlinked template not listed: %+v", all)
	}
	_ = os.Remove(filepath.Join(s.Dir, "linked"))
	if err := s.Delete("child"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("child"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted template: %v", err)
	}
	for _, bad := range []string{"", "../x", "A", "-x", "a/b", string(make([]byte, 70))} {
		if _, err := s.Install(ctx, bad, src, Metadata{}); err == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
	if _, err := s.Install(ctx, "x", filepath.Join(t.TempDir(), "missing"), Metadata{}); err == nil {
		t.Fatal("installing a missing file succeeded")
	}
}

func TestFlattenQcow2Child(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0x11}, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	child := filepath.Join(dir, "child.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", child)
	// The sandbox writes its first MiB; the rest still comes from the base.
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", child)

	flat := filepath.Join(dir, "flat.raw")
	if err := Flatten(ctx, child, "qcow2", flat); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(flat)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) != 4<<20 || !bytes.Equal(data[:1<<20], bytes.Repeat([]byte{0xab}, 1<<20)) || !bytes.Equal(data[1<<20:], bytes.Repeat([]byte{0x11}, 3<<20)) {
		t.Fatal("flattened image does not hold the child's writes over its base")
	}
	// The base was never written.
	if b, _ := os.ReadFile(base); !bytes.Equal(b, bytes.Repeat([]byte{0x11}, 4<<20)) {
		t.Fatal("base image changed")
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// The hole-skipping checksum is the SHA-256 of every byte of the file.
func TestChecksumOfSparseFiles(t *testing.T) {
	dir := t.TempDir()
	for name, layout := range map[string][]int64{
		"empty":            nil,
		"hole only":        {0, 0, 8 << 20},
		"data in a hole":   {3<<20 + 17, 5000, 9 << 20},
		"data at both end": {0, 4096, 2<<20 + 1},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		if len(layout) == 3 {
			if err := f.Truncate(layout[2]); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(bytes.Repeat([]byte("wrenn"), int(layout[1])/5+1)[:layout[1]], layout[0]); err != nil {
				t.Fatal(err)
			}
			if name == "data at both end" {
				if _, err := f.WriteAt([]byte("end"), layout[2]-3); err != nil {
					t.Fatal(err)
				}
			}
		}
		f.Close()
		data, _ := os.ReadFile(path)
		want := sha256.Sum256(data)
		got, err := Checksum(path)
		if err != nil || got != hex.EncodeToString(want[:]) {
			t.Fatalf("%s: checksum %s %v, want %x", name, got, err, want)
		}
	}
}
