package firecracker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/wrenn/wrenn/internal/agent/vmm"
)

// Jailer runs Firecracker under Firecracker's jailer: in a chroot of its
// own, in the sandbox's network namespace, as an unprivileged user, in a
// cgroup that caps its CPU and memory.
type Jailer struct {
	Binary     string // the jailer binary
	UID, GID   int
	ChrootBase string // default /srv/jailer
}

// jail describes one sandbox's chroot.
type jail struct {
	cfg  Jailer
	exec string // the firecracker binary
	id   string
}

func (d *Driver) jail(spec vmm.Spec) *jail {
	if d.Jailer == nil {
		return nil
	}
	cfg := *d.Jailer
	if cfg.ChrootBase == "" {
		cfg.ChrootBase = "/srv/jailer"
	}
	return &jail{cfg: cfg, exec: d.Binary, id: spec.ID}
}

// root is the directory the jailed Firecracker sees as "/".
func (j *jail) root() string {
	return filepath.Join(j.cfg.ChrootBase, filepath.Base(j.exec), j.id, "root")
}

// host turns a path inside the jail into the host's path.
func (j *jail) host(inside string) string { return filepath.Join(j.root(), inside) }

const jailedAPISocket = "/run/firecracker.socket"

// argv is the jailer command line; Firecracker's own arguments follow "--".
func (j *jail) argv(spec vmm.Spec) []string {
	args := []string{j.cfg.Binary,
		"--id", j.id, "--exec-file", j.exec,
		"--uid", strconv.Itoa(j.cfg.UID), "--gid", strconv.Itoa(j.cfg.GID),
		"--chroot-base-dir", j.cfg.ChrootBase, "--cgroup-version", "2",
		// Caps: its vCPUs' worth of CPU, and its memory plus 64 MiB for the VMM itself.
		"--cgroup", fmt.Sprintf("cpu.max=%d 100000", spec.VCPUs*100000),
		"--cgroup", fmt.Sprintf("memory.max=%d", int64(spec.MemoryMiB+64)<<20),
	}
	if spec.NetNS != "" {
		args = append(args, "--netns", "/var/run/netns/"+spec.NetNS)
	}
	return append(args, "--", "--api-sock", jailedAPISocket)
}

// stage puts a file into the jail at inside, owned by the jailed user: a
// hard link where possible (same file system), else a copy; block devices
// (device-mapper disks) are recreated with mknod.
func (j *jail) stage(hostPath, inside string) error {
	dst := j.host(inside)
	if err := os.MkdirAll(filepath.Dir(dst), 0o750); err != nil {
		return err
	}
	_ = os.Remove(dst)
	fi, err := os.Stat(hostPath)
	if err != nil {
		return fmt.Errorf("jail %s: %w", hostPath, err)
	}
	if fi.Mode()&os.ModeDevice != 0 {
		st := fi.Sys().(*syscall.Stat_t)
		if err := syscall.Mknod(dst, syscall.S_IFBLK|0o600, int(st.Rdev)); err != nil {
			return fmt.Errorf("jail %s: mknod: %w", hostPath, err)
		}
	} else if err := linkOrCopy(hostPath, dst); err != nil {
		return fmt.Errorf("jail %s: %w", hostPath, err)
	}
	return os.Chown(dst, j.cfg.UID, j.cfg.GID)
}

// unstage moves a file the jailed Firecracker wrote back out to the host.
func (j *jail) unstage(inside, hostPath string) error {
	return moveFile(j.host(inside), hostPath)
}

// remove deletes the jail and its cgroup.
func (j *jail) remove() error {
	err := os.RemoveAll(filepath.Dir(j.root()))
	if cg := filepath.Join("/sys/fs/cgroup", filepath.Base(j.exec), j.id); cg != "" {
		if rerr := os.Remove(cg); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}
