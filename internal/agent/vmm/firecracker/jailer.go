package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/procfs"
)

// Jailer runs Firecracker under Firecracker's jailer, as its production
// host setup recommends: each VMM in a chroot of its own, in a new PID
// namespace, in the sandbox's network namespace, in a cgroup that caps its
// CPU, memory and processes, as a user and group of its own.
type Jailer struct {
	Binary string // the jailer binary
	// FirstID and IDs are the uids (and the gids of the same numbers) jailed
	// VMMs run as: each VM takes one no other jail holds.
	FirstID, IDs int
	ChrootBase   string // default /srv/jailer
	// Cgroups is where the jailer makes each VM's cgroup (the agent's
	// layout, v1 or v2, and parent) and the VMM's overhead; nil: none.
	Cgroups *cgroup.VMMs
}

// Defaults of Jailer's id range: above the ids distributions hand out.
const (
	DefaultJailFirstID = 900000
	DefaultJailIDs     = 65536
)

// jailed launches each VM through the jailer. The jail's root directory,
// made by prepare and owned by the VM's own uid and gid, records which ids
// the VM has: nothing else needs to survive an agent restart.
type jailed struct {
	cfg     Jailer
	exec    string // the firecracker binary the jailer copies into the jail
	console vmm.ConsoleLog
	mu      sync.Mutex // picking a free id and claiming it with a jail
}

func newJailed(cfg Jailer, exec string, console vmm.ConsoleLog) *jailed {
	if cfg.ChrootBase == "" {
		cfg.ChrootBase = "/srv/jailer"
	}
	if cfg.IDs <= 0 {
		cfg.FirstID, cfg.IDs = DefaultJailFirstID, DefaultJailIDs
	}
	return &jailed{cfg: cfg, exec: exec, console: console}
}

// jails is the directory holding every jail of this firecracker binary.
func (j *jailed) jails() string { return filepath.Join(j.cfg.ChrootBase, filepath.Base(j.exec)) }

// root is the directory the jailed Firecracker sees as "/".
func (j *jailed) root(id string) string { return filepath.Join(j.jails(), id, "root") }

// host turns a path inside a jail into the host's path.
func (j *jailed) host(id, inside string) string { return filepath.Join(j.root(id), inside) }

// The jailed API socket, and the file the jailer writes the pid of the
// Firecracker it started into (<exec file name>.pid in the jail's root).
const jailedAPISocket = "/run/firecracker.socket"

func (j *jailed) pidFile(id string) string { return j.host(id, "/"+filepath.Base(j.exec)+".pid") }

func (j *jailed) socket(spec vmm.Spec) string { return j.host(spec.ID, jailedAPISocket) }

// prepare replaces any jail a crash left with an empty one owned by an id
// no other jail holds.
func (j *jailed) prepare(spec vmm.Spec) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.remove(spec.ID); err != nil {
		return fmt.Errorf("jail: clear the old one: %w", err)
	}
	used, err := j.usedIDs()
	if err != nil {
		return err
	}
	id := -1
	for n := j.cfg.FirstID; n < j.cfg.FirstID+j.cfg.IDs; n++ {
		if !used[n] {
			id = n
			break
		}
	}
	if id < 0 {
		return fmt.Errorf("jail: all %d jailer ids from %d are held by jails (raise --jailer-ids)", j.cfg.IDs, j.cfg.FirstID)
	}
	root := j.root(spec.ID)
	if err := os.MkdirAll(filepath.Dir(root), 0o700); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Mkdir(root, 0o700); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chown(root, id, id); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if spec.TapDevice != "" && spec.NetNS != "" {
		if err := setTapOwner(spec.NetNS, spec.TapDevice, id, id); err != nil {
			return fmt.Errorf("jail: the VM's network device: %w", err)
		}
	}
	return nil
}

// usedIDs are the uids of existing jails.
func (j *jailed) usedIDs() (map[int]bool, error) {
	entries, err := os.ReadDir(j.jails())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("jail: %w", err)
	}
	used := map[int]bool{}
	for _, e := range entries {
		if fi, err := os.Stat(j.root(e.Name())); err == nil {
			used[int(fi.Sys().(*syscall.Stat_t).Uid)] = true
		}
	}
	return used, nil
}

// ids are the uid and gid of the VM's jail.
func (j *jailed) ids(spec vmm.Spec) (int, int, error) { return j.jailIDs(spec.ID) }

func (j *jailed) jailIDs(id string) (int, int, error) {
	fi, err := os.Stat(j.root(id))
	if err != nil {
		return 0, 0, fmt.Errorf("jail: %w", err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	uid, gid := int(st.Uid), int(st.Gid)
	if !j.inRange(uid) || gid != uid {
		return 0, 0, fmt.Errorf("jail %s is owned by %d:%d, outside the jailer ids", j.root(id), uid, gid)
	}
	return uid, gid, nil
}

// place readies inside, in the jail, for hostPath: the directories above
// it (root's, traversable by the jailed user, writable by root alone) and
// no file there yet. It answers the host's path of inside and hostPath's
// details.
func (j *jailed) place(id, hostPath, inside string) (string, os.FileInfo, error) {
	dst := j.host(id, inside)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", nil, err
	}
	_ = os.Remove(dst)
	fi, err := os.Stat(hostPath)
	if err != nil {
		return "", nil, fmt.Errorf("jail %s: %w", hostPath, err)
	}
	return dst, fi, nil
}

// own links the VM's file into the jail and gives it to the VM's user; a
// device-mapper disk is recreated there with mknod. A copy would not do:
// the VMM's writes must reach the file itself, so the jails must be on the
// same file system as WRENN_DIR.
func (j *jailed) own(spec vmm.Spec, hostPath, inside string) (string, error) {
	uid, gid, err := j.jailIDs(spec.ID)
	if err != nil {
		return "", err
	}
	dst, fi, err := j.place(spec.ID, hostPath, inside)
	if err != nil {
		return "", err
	}
	if fi.Mode()&os.ModeDevice != 0 {
		st := fi.Sys().(*syscall.Stat_t)
		if err := syscall.Mknod(dst, syscall.S_IFBLK|0o600, int(st.Rdev)); err != nil {
			return "", fmt.Errorf("jail %s: mknod: %w", hostPath, err)
		}
	} else if err := os.Link(hostPath, dst); err != nil {
		return "", fmt.Errorf("jail %s: %w (the jailer's chroot base must be on the file system of WRENN_DIR)", hostPath, err)
	}
	return inside, os.Chown(dst, uid, gid)
}

// share puts a file many VMs read into the jail without giving it away:
// a hard link to a file owned by the agent's user with no write bits for
// anyone else, readable by all (the jail's user is "other"; the file's
// own directory keeps everyone else out), or else a private copy.
func (j *jailed) share(spec vmm.Spec, hostPath, inside string) (string, error) {
	dst, fi, err := j.place(spec.ID, hostPath, inside)
	if err != nil {
		return "", err
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().IsRegular() && int(st.Uid) == os.Geteuid() && fi.Mode().Perm()&0o022 == 0 {
		if fi.Mode().Perm()&0o004 == 0 {
			// Tenant files are made private at each agent start.
			if err := os.Chmod(hostPath, fi.Mode().Perm()|0o444); err != nil {
				return "", fmt.Errorf("jail %s: %w", hostPath, err)
			}
		}
		if err := os.Link(hostPath, dst); err == nil {
			return inside, nil
		}
	}
	if err := copyFile(hostPath, dst); err != nil {
		return "", fmt.Errorf("jail %s: %w", hostPath, err)
	}
	return inside, os.Chmod(dst, 0o444)
}

// output is where the jailed Firecracker writes a file: /snapshot, which
// the VM's user owns. The VMM owns its jail's "/" and runs while this is
// done, so everything here goes through an os.Root of the jail (no path
// may lead out of it) and never follows a link the VMM could have put.
func (j *jailed) output(spec vmm.Spec, _, name string) (string, error) {
	uid, gid, err := j.jailIDs(spec.ID)
	if err != nil {
		return "", err
	}
	root, err := os.OpenRoot(j.root(spec.ID))
	if err != nil {
		return "", fmt.Errorf("jail: %w", err)
	}
	defer root.Close()
	if err := root.MkdirAll("snapshot", 0o700); err != nil {
		return "", fmt.Errorf("jail: %w", err)
	}
	if err := root.Lchown("snapshot", uid, gid); err != nil {
		return "", fmt.Errorf("jail: %w", err)
	}
	// A new file, not the inode a restore mapped the guest's memory from.
	if err := root.Remove("snapshot/" + name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("jail: %w", err)
	}
	return "/snapshot/" + name, nil
}

// collect takes a file the jailed Firecracker wrote out of the jail, as
// the agent's: it opens exactly that file (no link followed, no second
// name), links that inode at hostPath and takes it from the VM's user.
func (j *jailed) collect(spec vmm.Spec, inside, hostPath string) error {
	root, err := os.OpenRoot(j.root(spec.ID))
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	defer root.Close()
	name := strings.TrimPrefix(inside, "/")
	f, err := root.OpenFile(name, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("jail %s: %w", inside, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Sys().(*syscall.Stat_t).Nlink != 1 {
		return fmt.Errorf("jail %s: the VMM left %v with %d names, not a file of its own", inside, fi.Mode().Type(), fi.Sys().(*syscall.Stat_t).Nlink)
	}
	if err := errors.Join(f.Chown(os.Geteuid(), os.Getegid()), f.Chmod(0o600)); err != nil {
		return fmt.Errorf("jail %s: %w", inside, err)
	}
	_ = os.Remove(hostPath)
	if err := unix.Linkat(int(f.Fd()), "", unix.AT_FDCWD, hostPath, unix.AT_EMPTY_PATH); err != nil {
		// Another file system: copy what was opened.
		if err := copyFrom(f, hostPath); err != nil {
			return fmt.Errorf("jail %s: %w", inside, err)
		}
	}
	return root.Remove(name)
}

func (j *jailed) uffdSocket(spec vmm.Spec) (string, string) {
	return j.host(spec.ID, "/uffd.sock"), "/uffd.sock"
}

func (j *jailed) grant(spec vmm.Spec, hostPath string) error {
	uid, gid, err := j.jailIDs(spec.ID)
	if err != nil {
		return err
	}
	return os.Chown(hostPath, uid, gid)
}

// argv is the jailer's command line; Firecracker's own arguments follow "--".
func (j *jailed) argv(spec vmm.Spec, uid, gid int) []string {
	args := []string{j.cfg.Binary,
		"--id", spec.ID, "--exec-file", j.exec,
		"--uid", strconv.Itoa(uid), "--gid", strconv.Itoa(gid),
		"--chroot-base-dir", j.cfg.ChrootBase,
		"--new-pid-ns",
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

// start runs the jailer, which forks Firecracker into a new PID namespace,
// writes its pid into the jail and exits: that pid is the VMM.
func (j *jailed) start(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	uid, gid, err := j.jailIDs(spec.ID)
	if err != nil {
		return vmm.Instance{}, err
	}
	_ = os.Remove(j.pidFile(spec.ID)) // the jailer refuses to write over one
	argv := j.argv(spec, uid, gid)
	spec.NetNS = "" // the jailer joins the namespace itself
	// The jailer needs the agent's privileges to build the jail and drops
	// them itself before it execs Firecracker.
	return vmm.StartProcess(ctx, spec, argv, j.socket(spec), vmm.StartOptions{KeepPrivileges: true, Console: j.console, PIDFile: j.pidFile(spec.ID)})
}

// marker is in every jailed Firecracker's command line: the jailer passes
// "--id" and the id as two arguments.
func marker(id string) string { return "\x00--id\x00" + id + "\x00" }

func (j *jailed) alive(spec vmm.Spec, inst vmm.Instance) bool {
	return vmm.ProcessAlive(inst, marker(spec.ID))
}

func (j *jailed) stop(ctx context.Context, spec vmm.Spec, inst vmm.Instance) error {
	if err := vmm.KillProcess(ctx, inst, marker(spec.ID)); err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	err := j.remove(spec.ID)
	// The VMM may have renamed its links away from the walk in remove: the
	// files own handed out are known by their host paths too.
	for _, p := range []string{spec.Disk, baseMemory(spec)} {
		if fi, lerr := os.Lstat(p); lerr == nil && fi.Mode().IsRegular() && j.inRange(int(fi.Sys().(*syscall.Stat_t).Uid)) {
			err = errors.Join(err, os.Lchown(p, os.Geteuid(), os.Getegid()))
		}
	}
	return err
}

// inRange says whether id is one of the jailer ids.
func (j *jailed) inRange(id int) bool { return id >= j.cfg.FirstID && id < j.cfg.FirstID+j.cfg.IDs }

// killStale ends the Firecracker a jail's pid file names, if it still
// runs as that jail's VMM: one left by a crash, a start cut short, or a
// jailer that failed after forking it. Its jail must not be removed (and
// its uid handed on) under it.
func (j *jailed) killStale(id string) {
	inst, err := vmm.ReadPIDFile(j.pidFile(id))
	if err != nil {
		return // none written, or its process is gone
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = vmm.KillProcess(ctx, inst, marker(id))
}

// remove deletes a VM's jail and its cgroup, after any VMM still in it.
// Files own gave the VM's user go back to the agent's first: the id will
// be another VM's.
func (j *jailed) remove(id string) error {
	j.killStale(id)
	// Nothing may still run as the jail's uid when it is handed on (its
	// VMM's page-fault handler, or anything else it left): that process
	// could reach the next jail of the uid.
	if uid, _, err := j.jailIDs(id); err == nil {
		killUID(uid)
	}
	_ = filepath.WalkDir(j.root(id), func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			st := fi.Sys().(*syscall.Stat_t)
			if st.Nlink > 1 && j.inRange(int(st.Uid)) {
				_ = os.Lchown(path, os.Geteuid(), os.Getegid())
			}
		}
		return nil
	})
	err := os.RemoveAll(filepath.Join(j.jails(), id))
	if cg := j.cfg.Cgroups; cg != nil {
		err = errors.Join(err, cg.Remove(id))
	}
	return err
}

// killUID ends every process running as uid (real, effective or saved)
// and waits for them to go, bounded.
func killUID(uid int) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		ids, err := procfs.Status(pid, "Uid")
		if err != nil {
			continue
		}
		f := strings.Fields(ids)
		if len(f) >= 3 && (f[0] == strconv.Itoa(uid) || f[1] == strconv.Itoa(uid) || f[2] == strconv.Itoa(uid)) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			_ = vmm.WaitGone(ctx, pid)
		}
	}
}
