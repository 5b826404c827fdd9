// Package imageimport turns a container image tarball (`docker save`
// output or an OCI image layout) into an ext4 template, without a Docker
// engine: go-containerregistry reads and flattens the layers, GNU tar
// unpacks the result, and e2fsprogs writes the image.
package imageimport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/wrenn/wrenn/internal/guest/ext4"
)

// Options say what to inject and how big to make the disk.
type Options struct {
	Envd     string // envd binary to place at /usr/local/bin/envd
	Init     string // wrenn-init binary to place at /usr/local/bin/wrenn-init
	Tini     string // static tini, placed at /usr/bin/tini when the image has none
	Headroom int64  // free bytes for the sandbox's own files
	WorkDir  string // where to unpack (a temporary directory inside it)
	Log      *slog.Logger
}

// ToExt4 imports the image at src and writes an ext4 image to dest.
func ToExt4(ctx context.Context, src, dest string, opts Options) error {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	img, err := Load(src)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp(opts.WorkDir, "wrenn-import")
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer os.RemoveAll(work)
	tree := filepath.Join(work, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return fmt.Errorf("import: %w", err)
	}
	opts.Log.Info("unpacking image layers", "source", src)
	if err := unpack(ctx, img, tree); err != nil {
		return err
	}
	if err := inject(tree, opts); err != nil {
		return err
	}
	if err := ensureUser(tree); err != nil {
		return err
	}
	used, err := duBytes(ctx, tree)
	if err != nil {
		return err
	}
	size := used + used/4 + opts.Headroom
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	opts.Log.Info("writing ext4 image", "content_bytes", used, "image_bytes", size)
	tmp := dest + ".importing"
	if err := ext4.FromDir(ctx, tree, tmp, size, "rootfs"); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, dest)
}

// Load opens a docker-save tarball or an OCI image layout directory.
func Load(src string) (v1.Image, error) {
	fi, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("open image %s: %w", src, err)
	}
	if !fi.IsDir() {
		img, err := tarball.ImageFromPath(src, nil)
		if err != nil {
			return nil, fmt.Errorf("read image tarball %s (docker save format, exactly one image): %w", src, err)
		}
		return img, nil
	}
	idx, err := layout.ImageIndexFromPath(src)
	if err != nil {
		return nil, fmt.Errorf("read OCI layout %s: %w", src, err)
	}
	manifest, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read OCI index %s: %w", src, err)
	}
	for _, d := range manifest.Manifests {
		if d.Platform != nil && (d.Platform.OS != "linux" || d.Platform.Architecture != "amd64") {
			continue
		}
		if !d.MediaType.IsImage() {
			continue
		}
		return idx.Image(d.Digest)
	}
	return nil, fmt.Errorf("OCI layout %s has no linux/amd64 image", src)
}

// unpack writes the flattened file system (whiteouts applied) into tree,
// keeping owners, modes and device files.
func unpack(ctx context.Context, img v1.Image, tree string) error {
	rc := mutate.Extract(img)
	defer rc.Close()
	cmd := exec.CommandContext(ctx, "tar", "-x", "-p", "--numeric-owner", "--xattrs", "-C", tree)
	cmd.Stdin = rc
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("unpack layers: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

func inject(tree string, opts Options) error {
	files := []struct{ from, to string }{
		{opts.Envd, "usr/local/bin/envd"},
		{opts.Init, "usr/local/bin/wrenn-init"},
	}
	if _, err := os.Lstat(filepath.Join(tree, "usr/bin/tini")); err != nil {
		if opts.Tini == "" {
			return errors.New("the image has no /usr/bin/tini and no static tini was given (apt-get install tini: /usr/bin/tini-static)")
		}
		files = append(files, struct{ from, to string }{opts.Tini, "usr/bin/tini"})
	}
	for _, f := range files {
		if f.from == "" {
			return fmt.Errorf("no binary given for /%s", f.to)
		}
		if err := copyFile(f.from, filepath.Join(tree, f.to), 0o755); err != nil {
			return fmt.Errorf("inject /%s: %w", f.to, err)
		}
	}
	return nil
}

func copyFile(from, to string, mode os.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	_ = os.Remove(to) // it may be a symlink pointing anywhere
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// ensureUser adds the `user` account envd acts as by default, with a home
// and passwordless sudo where sudo exists, unless the image has one.
func ensureUser(tree string) error {
	passwdPath := filepath.Join(tree, "etc/passwd")
	passwd, err := os.ReadFile(passwdPath)
	if err != nil {
		return fmt.Errorf("image has no /etc/passwd: %w", err)
	}
	used := map[int]bool{}
	for _, line := range strings.Split(string(passwd), "\n") {
		f := strings.Split(line, ":")
		if len(f) < 4 {
			continue
		}
		if f[0] == "user" {
			return nil
		}
		if n, err := strconv.Atoi(f[2]); err == nil {
			used[n] = true
		}
		if n, err := strconv.Atoi(f[3]); err == nil {
			used[n] = true
		}
	}
	id := 1000
	for used[id] {
		id++
	}
	shell := "/bin/sh"
	if _, err := os.Stat(filepath.Join(tree, "bin/bash")); err == nil {
		shell = "/bin/bash"
	}
	appends := map[string]string{
		"etc/passwd": fmt.Sprintf("user:x:%d:%d::/home/user:%s\n", id, id, shell),
		"etc/group":  fmt.Sprintf("user:x:%d:\n", id),
	}
	if _, err := os.Stat(filepath.Join(tree, "etc/shadow")); err == nil {
		appends["etc/shadow"] = "user:*:19000:0:99999:7:::\n"
	}
	for rel, line := range appends {
		if err := appendLine(filepath.Join(tree, rel), line); err != nil {
			return fmt.Errorf("add user account: %w", err)
		}
	}
	home := filepath.Join(tree, "home/user")
	if err := os.MkdirAll(home, 0o750); err != nil {
		return fmt.Errorf("add user home: %w", err)
	}
	if err := os.Chown(home, id, id); err != nil {
		return fmt.Errorf("add user home: %w", err)
	}
	if fi, err := os.Stat(filepath.Join(tree, "etc/sudoers.d")); err == nil && fi.IsDir() {
		if err := os.WriteFile(filepath.Join(tree, "etc/sudoers.d/wrenn-user"), []byte("user ALL=(ALL:ALL) NOPASSWD: ALL\n"), 0o440); err != nil {
			return fmt.Errorf("add user sudo rule: %w", err)
		}
	}
	return nil
}

func appendLine(path, line string) error {
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if len(data) > 0 && data[len(data)-1] != '\n' {
		line = "\n" + line
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func duBytes(ctx context.Context, dir string) (int64, error) {
	out, err := exec.CommandContext(ctx, "du", "-s", "--block-size=1", dir).Output()
	if err != nil {
		return 0, fmt.Errorf("measure %s: %w", dir, err)
	}
	n, err := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("measure %s: %w", dir, err)
	}
	return n, nil
}
