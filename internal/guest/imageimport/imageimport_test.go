package imageimport

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/wrenn/wrenn/internal/guest/ext4"
)

type entry struct {
	name, body string
	mode       int64
	uid        int
	dir        bool
}

func layerOf(t *testing.T, entries []entry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: e.mode, Uid: e.uid, Gid: e.uid, Size: int64(len(e.body)), Typeflag: tar.TypeReg}
		if e.dir {
			h.Typeflag, h.Size = tar.TypeDir, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if !e.dir {
			_, _ = tw.Write([]byte(e.body))
		}
	}
	_ = tw.Close()
	data := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// testImage has two layers; the second deletes a file of the first with a
// whiteout, which the import must honour.
func testImage(t *testing.T) v1.Image {
	base := layerOf(t, []entry{
		{name: "etc/", mode: 0o755, dir: true},
		{name: "etc/passwd", body: "root:x:0:0:root:/root:/bin/sh\nbin:x:1000:1000::/:/bin/false\n", mode: 0o644},
		{name: "etc/group", body: "root:x:0:\n", mode: 0o644},
		{name: "etc/sudoers.d/", mode: 0o750, dir: true},
		{name: "app/", mode: 0o755, dir: true},
		{name: "app/keep.txt", body: "kept", mode: 0o600, uid: 1234},
		{name: "app/gone.txt", body: "deleted later", mode: 0o644},
	})
	top := layerOf(t, []entry{
		{name: "app/.wh.gone.txt", mode: 0o644},
		{name: "app/new.txt", body: "from the top layer", mode: 0o644},
	})
	img, err := mutate.AppendLayers(empty.Image, base, top)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func fakeBinary(t *testing.T, dir, name string) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho "+name+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestImportDockerSaveAndOCILayout(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to keep file owners in the image")
	}
	ctx := context.Background()
	dir := t.TempDir()
	img := testImage(t)

	saved := filepath.Join(dir, "image.tar")
	ref, _ := name.ParseReference("example.test/wrenn/import:1")
	if err := tarball.WriteToFile(saved, ref, img); err != nil {
		t.Fatal(err)
	}
	ociDir := filepath.Join(dir, "oci")
	lp, err := layout.Write(ociDir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img); err != nil {
		t.Fatal(err)
	}

	opts := Options{
		Envd: fakeBinary(t, dir, "envd"), Init: fakeBinary(t, dir, "wrenn-init"), Tini: fakeBinary(t, dir, "tini"),
		Headroom: 16 << 20, WorkDir: dir, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for label, src := range map[string]string{"docker-save": saved, "oci-layout": ociDir} {
		t.Run(label, func(t *testing.T) {
			out := filepath.Join(dir, label+".ext4")
			if err := ToExt4(ctx, src, out, opts); err != nil {
				t.Fatal(err)
			}
			read := func(p string) string {
				b, err := ext4.ReadFile(ctx, out, p)
				if err != nil {
					t.Fatalf("%s: %v", p, err)
				}
				return string(b)
			}
			if read("/app/keep.txt") != "kept" || read("/app/new.txt") != "from the top layer" {
				t.Fatal("layer content missing")
			}
			if _, err := ext4.ReadFile(ctx, out, "/app/gone.txt"); err == nil {
				t.Fatal("whiteout not applied: /app/gone.txt is in the image")
			}
			if read("/usr/local/bin/envd") != "#!/bin/sh\necho envd\n" || read("/usr/bin/tini") == "" || read("/usr/local/bin/wrenn-init") == "" {
				t.Fatal("binaries not injected")
			}
			// uid 1000 is taken in the image, so user gets 1001.
			if !strings.Contains(read("/etc/passwd"), "user:x:1001:1001::/home/user:/bin/sh\n") || read("/etc/sudoers.d/wrenn-user") == "" {
				t.Fatalf("user account: %q", read("/etc/passwd"))
			}
			stat, err := exec.Command("debugfs", "-R", "stat /app/keep.txt", out).CombinedOutput()
			if err != nil || !strings.Contains(string(stat), "User:  1234") || !strings.Contains(string(stat), "Mode:  0600") {
				t.Fatalf("owner or mode lost:\n%s", stat)
			}
		})
	}

	if err := ToExt4(ctx, filepath.Join(dir, "missing.tar"), filepath.Join(dir, "x.ext4"), opts); err == nil {
		t.Fatal("importing a missing file succeeded")
	}
	junk := filepath.Join(dir, "junk.tar")
	_ = os.WriteFile(junk, []byte("not a tarball"), 0o644)
	if err := ToExt4(ctx, junk, filepath.Join(dir, "x.ext4"), opts); err == nil {
		t.Fatal("importing junk succeeded")
	}
	if _, err := os.Stat(filepath.Join(dir, "x.ext4")); !os.IsNotExist(err) {
		t.Fatal("a failed import left an image behind")
	}
}
