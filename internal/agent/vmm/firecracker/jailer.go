package firecracker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/agent/vmm"
)

// Jailer runs Firecracker under Firecracker's jailer: in a chroot of its
// own, in the sandbox's network namespace, as an unprivileged user, in a
// cgroup that caps its CPU, memory and processes.
type Jailer struct {
	Binary     string // the jailer binary
	UID, GID   int
	ChrootBase string // default /srv/jailer
	// Cgroups is where the jailer makes each VM's cgroup (the agent's
	// layout, v1 or v2, and parent) and the VMM's overhead; nil: none.
	Cgroups *cgroup.VMMs
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
		"--chroot-base-dir", j.cfg.ChrootBase,
	}
	if cg := j.cfg.Cgroups; cg != nil {
		version := "1"
		if cg.V2 {
			version = "2"
		}
		args = append(args, "--cgroup-version", version, "--parent-cgroup", cg.Parent)
		for _, s := range cg.Settings(cgroup.ForVM(spec.VCPUs, spec.MemoryMiB, cg.OverheadMiB)) {
			args = append(args, "--cgroup", s)
		}
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
	if cg := j.cfg.Cgroups; cg != nil {
		err = errors.Join(err, cg.Remove(j.id))
	}
	return err
}

// stageReadOnly puts a shared, read-only file into the jail at inside: a
// hard link that keeps its owner and mode (a memory template's files,
// which many jails link at once), or a copy, made read only for the
// jailed user, where a link cannot be made.
func (j *jail) stageReadOnly(hostPath, inside string) error {
	dst := j.host(inside)
	if err := os.MkdirAll(filepath.Dir(dst), 0o750); err != nil {
		return err
	}
	_ = os.Chown(filepath.Dir(dst), 0, j.cfg.GID)
	_ = os.Remove(dst)
	// Readable by the jail's group, at each use: the agent makes tenant
	// files private again at every start.
	if err := errors.Join(os.Chown(hostPath, os.Geteuid(), j.cfg.GID), os.Chmod(hostPath, 0o440)); err != nil {
		return fmt.Errorf("jail %s: %w", hostPath, err)
	}
	if err := os.Link(hostPath, dst); err == nil {
		return nil
	}
	if err := copyFile(hostPath, dst); err != nil {
		return fmt.Errorf("jail %s: %w", hostPath, err)
	}
	return errors.Join(os.Chown(dst, os.Geteuid(), j.cfg.GID), os.Chmod(dst, 0o440))
}
