// Package privdrop lets the host agent start as root, do the few things
// only root may do, and go on as an unprivileged user that keeps just the
// capabilities its work needs.
//
// The root part is short: delegate the VMMs' cgroup parent to the user and
// move the agent into it (so it may move its VMMs between groups, which
// cgroup v2 allows only below a common ancestor the mover can write), and
// hand /run/netns to the user (ip netns add creates files there). Then the
// agent execs itself through setpriv as the user.
package privdrop

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
)

// keptCaps is setpriv's form of the capabilities the agent keeps.
// net_admin: links, TAP devices, routes, iptables rules and network
// sysctls; net_raw: iptables; sys_admin: making network namespaces (a bind
// mount) and entering them (setns).
const keptCaps = "-all,+net_admin,+net_raw,+sys_admin"

// AgentGroup is the agent's own group below the cgroup parent. Its name
// starts with a dot, which no sandbox id does.
const AgentGroup = ".agent"

// Plan is what Become sets up before it drops root.
type Plan struct {
	User     string
	WrennDir string
	// Cgroups, when set, is the VMMs' parent to delegate to the user.
	Cgroups *cgroup.Hierarchy
	// Args are the agent's arguments, for the unprivileged run.
	Args []string
}

// Become prepares the host as root and replaces this process with the
// agent running as p.User. The new agent sees the same flags, and Become
// returns nil to it because it already is that user; anything else that
// returns is an error.
func Become(p Plan) error {
	u, err := user.Lookup(p.User)
	if err != nil {
		return fmt.Errorf("--user: %w (scripts/prepare-wrenn-user.sh creates it)", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	switch {
	case uid == 0:
		return fmt.Errorf("--user %s is root", p.User)
	case os.Geteuid() == uid:
		return nil
	case os.Geteuid() != 0:
		return fmt.Errorf("--user %s: start the agent as root; it drops to the user itself", p.User)
	}
	if err := checkOwner(p.WrennDir, uid); err != nil {
		return err
	}
	if err := os.MkdirAll("/run/netns", 0o755); err != nil {
		return fmt.Errorf("prepare /run/netns: %w", err)
	}
	if err := os.Chown("/run/netns", uid, gid); err != nil {
		return fmt.Errorf("prepare /run/netns: %w", err)
	}
	if p.Cgroups != nil {
		if err := delegate(*p.Cgroups, uid, gid); err != nil {
			return err
		}
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		return fmt.Errorf("--user needs setpriv (util-linux): %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find the agent binary: %w", err)
	}
	err = syscall.Exec(setpriv, append(setprivArgs(uid, gid), append([]string{self}, p.Args...)...), os.Environ())
	return fmt.Errorf("exec setpriv: %w", err)
}

// setprivArgs is setpriv's command line up to the program: become uid:gid
// (with the user's groups, kvm among them) holding exactly the kept
// capabilities, inherited by the agent's own helpers (ip, iptables) and
// nothing more.
func setprivArgs(uid, gid int) []string {
	return []string{"setpriv", "--reuid=" + strconv.Itoa(uid), "--regid=" + strconv.Itoa(gid), "--init-groups",
		"--inh-caps=" + keptCaps, "--ambient-caps=" + keptCaps, "--bounding-set=" + keptCaps, "--"}
}

// checkOwner insists that the user owns WRENN_DIR: sandboxes made by a
// root agent cannot be managed by an unprivileged one.
func checkOwner(dir string, uid int) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != uid {
		return fmt.Errorf("%s belongs to uid %d, not the agent's user (uid %d): pause or destroy its sandboxes, then run scripts/prepare-wrenn-user.sh", dir, st.Uid, uid)
	}
	return nil
}

// delegate gives the user the VMMs' cgroup parent, the way a cgroup is
// delegated (the directory and the files that manage membership and
// controllers), and moves this process into the parent's agent group.
func delegate(h cgroup.Hierarchy, uid, gid int) error {
	if err := h.Prepare(); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, dir := range h.Paths(AgentGroup) {
		parent := filepath.Dir(dir)
		if seen[parent] {
			continue
		}
		seen[parent] = true
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("cgroup %s: %w", dir, err)
		}
		for _, d := range []string{parent, dir} {
			if err := chownGroup(d, uid, gid); err != nil {
				return err
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return fmt.Errorf("move the agent into %s: %w", dir, err)
		}
	}
	return nil
}

func chownGroup(dir string, uid, gid int) error {
	if err := os.Chown(dir, uid, gid); err != nil {
		return fmt.Errorf("delegate %s: %w", dir, err)
	}
	for _, f := range []string{"cgroup.procs", "cgroup.subtree_control", "cgroup.threads", "tasks"} {
		if err := os.Chown(filepath.Join(dir, f), uid, gid); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("delegate %s: %w", dir, err)
		}
	}
	return nil
}
