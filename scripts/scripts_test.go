// Package scripts tests the shell scripts operators run to make images.
package scripts

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/guest/ext4"
	"github.com/wrenn/wrenn/internal/guest/template"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
)

// guestBuilds builds envd, wrenn-init and wrenn-image for the scripts.
func guestBuilds(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, pkg := range []string{"envd", "wrenn-init", "wrenn-image"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, pkg), "github.com/wrenn/wrenn/cmd/"+pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	return dir
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the image scripts run as root to keep file owners")
	}
}

func runScript(t *testing.T, env []string, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command("bash", append([]string{script}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", script, args, err, out)
	}
	return string(out)
}

// TestRootfsFromContainer runs the Docker export path with a stand-in
// `docker` command (no Docker engine here) that serves a prepared export.
func TestRootfsFromContainer(t *testing.T) {
	requireRoot(t)
	builds := guestBuilds(t)
	work := t.TempDir()

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range []struct {
		name, body string
		dir        bool
	}{
		{name: "etc/", dir: true},
		{name: "etc/passwd", body: "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"},
		{name: "etc/os-release", body: "ID=exported\n"},
		{name: "usr/", dir: true},
		{name: "usr/bin/", dir: true},
	} {
		h := &tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.body)), Typeflag: tar.TypeReg}
		if f.dir {
			h.Typeflag, h.Mode, h.Size = tar.TypeDir, 0o755, 0
		}
		_ = tw.WriteHeader(h)
		_, _ = tw.Write([]byte(f.body))
	}
	_ = tw.Close()
	export := filepath.Join(work, "export.tar")
	_ = os.WriteFile(export, buf.Bytes(), 0o644)

	bin := filepath.Join(work, "bin")
	_ = os.Mkdir(bin, 0o755)
	fakeDocker := "#!/bin/sh\n[ \"$1\" = export ] && [ \"$2\" = my-container ] || { echo \"unexpected docker $*\" >&2; exit 1; }\ncat " + export + "\n"
	_ = os.WriteFile(filepath.Join(bin, "docker"), []byte(fakeDocker), 0o755)

	wrennDir := filepath.Join(work, "wrenn")
	runScript(t, []string{"PATH=" + bin + ":" + os.Getenv("PATH"), "WRENN_DIR=" + wrennDir, "WRENN_BUILDS=" + builds, "HEADROOM=8M"},
		"rootfs-from-container.sh", "my-container", "exported")

	store := template.Store{Dir: filepath.Join(wrennDir, "images")}
	m, err := store.Get("exported")
	if err != nil {
		t.Fatal(err)
	}
	if m.Source != "docker:my-container" || m.EnvdVersion == "" || m.SizeBytes > 64<<20 {
		t.Fatalf("metadata %+v", m)
	}
	ctx := context.Background()
	for path, want := range map[string]string{"/etc/os-release": "ID=exported\n"} {
		if got, err := ext4.ReadFile(ctx, store.RootfsPath("exported"), path); err != nil || string(got) != want {
			t.Fatalf("%s: %q %v", path, got, err)
		}
	}
	for _, path := range []string{"/usr/local/bin/envd", "/usr/local/bin/wrenn-init", "/usr/bin/tini"} {
		if got, err := ext4.ReadFile(ctx, store.RootfsPath("exported"), path); err != nil || len(got) < 1000 {
			t.Fatalf("%s not injected (%d bytes, %v)", path, len(got), err)
		}
	}
	// The recorded checksum matches what shrink left on disk.
	if sum, _ := template.Checksum(store.RootfsPath("exported")); sum != m.SHA256 {
		t.Fatal("metadata checksum does not match the image")
	}
}

// TestUpdateMinimalRootfs refreshes envd inside a copy of the minimal image.
func TestUpdateMinimalRootfs(t *testing.T) {
	requireRoot(t)
	_, _, src := guestimages.Require(t)
	ctx := context.Background()
	builds := guestBuilds(t)
	wrennDir := t.TempDir()
	store := template.Store{Dir: filepath.Join(wrennDir, "images")}
	if _, err := store.Install(ctx, "minimal", src, template.Metadata{Source: "debootstrap"}); err != nil {
		t.Fatal(err)
	}
	// Make the image's envd stale, then refresh it.
	cmd := exec.Command("debugfs", "-w", "-R", "rm /usr/local/bin/envd", store.RootfsPath("minimal"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	runScript(t, []string{"WRENN_DIR=" + wrennDir, "WRENN_BUILDS=" + builds}, "update-minimal-rootfs.sh", "minimal")

	got, err := ext4.ReadFile(ctx, store.RootfsPath("minimal"), "/usr/local/bin/envd")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(builds, "envd"))
	if !bytes.Equal(got, want) {
		t.Fatal("envd in the image is not the freshly built one")
	}
	stat, _ := exec.Command("debugfs", "-R", "stat /usr/local/bin/envd", store.RootfsPath("minimal")).CombinedOutput()
	if !strings.Contains(string(stat), "Mode:  0755") || !strings.Contains(string(stat), "User:     0") {
		t.Fatalf("envd mode or owner wrong:\n%s", stat)
	}
	m, err := store.Get("minimal")
	if err != nil {
		t.Fatal(err)
	}
	if sum, _ := template.Checksum(store.RootfsPath("minimal")); sum != m.SHA256 || m.Source != "debootstrap" {
		t.Fatalf("metadata not refreshed: %+v", m)
	}
}
