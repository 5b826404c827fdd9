// Package cgroup gives each VMM a control group of its own with CPU, memory
// and process-count limits, so a VMM that misbehaves (or a guest that
// breaks out into it) is capped by the host kernel, not only by the size
// of its VM. Both layouts are handled: the unified hierarchy (cgroup v2)
// and separate cpu, memory and pids hierarchies (cgroup v1, also the
// "hybrid" layout where v2 is mounted without those controllers).
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/agent/vmm"
)

// controllers are the ones the limits need.
func controllers() []string { return []string{"cpu", "memory", "pids"} }

// Limits for one VMM.
type Limits struct {
	// CPUs is the share of CPU time, in CPUs (1.5 = one and a half).
	CPUs float64
	// MemoryBytes caps the VMM's memory, guest RAM included.
	MemoryBytes int64
	// Pids caps the VMM's processes and threads.
	Pids int
}

// ForVM returns the limits for a VM: its vCPUs plus a quarter CPU for
// device emulation; twice its memory plus the VMM's own overhead (the
// guest's RAM, and the page cache of writing a snapshot of that RAM, which
// the group is charged for and which a file system such as tmpfs cannot
// drop); and room for the VMM's threads and the helper it starts to write
// snapshots. The memory limit is a cap on a runaway VMM, not a packing
// figure: hitting it kills the VMM.
func ForVM(vcpus, memoryMiB, overheadMiB int) Limits {
	return Limits{
		CPUs:        float64(vcpus) + 0.25,
		MemoryBytes: int64(2*memoryMiB+overheadMiB) << 20,
		Pids:        128 + 4*vcpus,
	}
}

// Hierarchy is where the groups live: one directory per controller on
// cgroup v1, the same directory for all on v2.
type Hierarchy struct {
	V2 bool
	// Parent is the parent's path below each hierarchy's root ("wrenn").
	Parent string
	// Dirs maps a controller to the directory VM groups are made in (the
	// parent, e.g. /sys/fs/cgroup/memory/wrenn).
	Dirs map[string]string
}

// Detect finds the controllers in mountinfo (normally /proc/self/mountinfo)
// and returns the hierarchy with parent (a path such as "wrenn", relative
// to each hierarchy's root) under it.
func Detect(mountinfo io.Reader, parent string) (Hierarchy, error) {
	// Cleaned from "/", a parent cannot climb out of the hierarchy.
	parent = strings.Trim(filepath.Clean("/"+parent), "/")
	if parent == "" {
		return Hierarchy{}, fmt.Errorf("cgroup parent %q: want a path such as wrenn", parent)
	}
	v1 := map[string]string{}
	var v2 string
	sc := bufio.NewScanner(mountinfo)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+3 > len(fields) {
			continue
		}
		mountpoint, fstype := unescape(fields[4]), fields[sep+1]
		switch fstype {
		case "cgroup2":
			if v2 == "" {
				v2 = mountpoint
			}
		case "cgroup":
			for _, opt := range strings.Split(fields[sep+3], ",") {
				for _, c := range controllers() {
					if opt == c {
						v1[c] = mountpoint
					}
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return Hierarchy{}, fmt.Errorf("read mountinfo: %w", err)
	}
	h := Hierarchy{Parent: parent, Dirs: map[string]string{}}
	if len(v1) == 0 && v2 != "" {
		h.V2 = true
		for _, c := range controllers() {
			h.Dirs[c] = filepath.Join(v2, parent)
		}
		return h, nil
	}
	for _, c := range controllers() {
		mp, ok := v1[c]
		if !ok {
			return Hierarchy{}, fmt.Errorf("no cgroup v1 %s controller mounted (found %v), and cgroup v2 is not the only hierarchy", c, keys(v1))
		}
		h.Dirs[c] = filepath.Join(mp, parent)
	}
	return h, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func keys(m map[string]string) []string {
	var out []string
	for _, c := range controllers() {
		if _, ok := m[c]; ok {
			out = append(out, c)
		}
	}
	return out
}

// Prepare makes the parent groups and, on v2, enables the controllers for
// the VM groups below them. On v2 the parent's own parent must already
// delegate them (the root does when the agent is root;
// scripts/prepare-wrenn-user.sh sets it up for an unprivileged agent).
func (h Hierarchy) Prepare() error {
	for _, dir := range h.dirs() {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("cgroup parent: %w", err)
		}
	}
	if !h.V2 {
		// v1 memory groups must account their children for a limit to
		// hold over nested groups; the kernel default differs by version.
		_ = os.WriteFile(filepath.Join(h.Dirs["memory"], "memory.use_hierarchy"), []byte("1"), 0)
		return nil
	}
	dir := h.Dirs["memory"]
	if err := enable(filepath.Dir(dir)); err != nil {
		return err
	}
	return enable(dir)
}

// enable turns on the controllers for dir's children; already on is fine.
func enable(dir string) error {
	have, err := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
	if err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	var want []string
	for _, c := range controllers() {
		if !strings.Contains(" "+strings.TrimSpace(string(have))+" ", " "+c+" ") {
			want = append(want, "+"+c)
		}
	}
	if len(want) == 0 {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(want, " ")), 0); err != nil {
		return fmt.Errorf("cgroup: enable %s in %s: %w", strings.Join(want, " "), dir, err)
	}
	return nil
}

// dirs lists the distinct parent directories.
func (h Hierarchy) dirs() []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range controllers() {
		if d := h.Dirs[c]; !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

// Paths returns the group directories of VM id, one per distinct hierarchy.
func (h Hierarchy) Paths(id string) []string {
	var out []string
	for _, d := range h.dirs() {
		out = append(out, filepath.Join(d, id))
	}
	return out
}

// Confine makes (or reuses) VM id's group with lim and moves pid into it,
// with all its threads.
func (h Hierarchy) Confine(id string, pid int, lim Limits) error {
	if id == "" || id != filepath.Base(id) || id == "." || id == ".." {
		return fmt.Errorf("cgroup: bad group name %q", id)
	}
	for _, dir := range h.Paths(id) {
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("cgroup for %s: %w", id, err)
		}
	}
	for _, s := range h.Settings(lim) {
		file, value, _ := strings.Cut(s, "=")
		controller, _, _ := strings.Cut(file, ".")
		if err := os.WriteFile(filepath.Join(h.Dirs[controller], id, file), []byte(value), 0); err != nil {
			return fmt.Errorf("cgroup limit %s for %s: %w", file, id, err)
		}
	}
	if h.V2 {
		// Swapping a guest's RAM out would hide the limit and slow every
		// sandbox on the host. Kernels without swap accounting lack the file.
		err := os.WriteFile(filepath.Join(h.Dirs["memory"], id, "memory.swap.max"), []byte("0"), 0)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cgroup limit memory.swap.max for %s: %w", id, err)
		}
	}
	for _, dir := range h.Paths(id) {
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("move vmm %d into %s: %w", pid, dir, err)
		}
	}
	return nil
}

const periodUS = 100000

// Settings lists lim as the cgroup files that set it, "file=value", in the
// order they are written (the form Firecracker's jailer takes too).
func (h Hierarchy) Settings(lim Limits) []string {
	quota := strconv.Itoa(int(lim.CPUs * periodUS))
	memory := strconv.FormatInt(lim.MemoryBytes, 10)
	pids := strconv.Itoa(lim.Pids)
	if h.V2 {
		return []string{"cpu.max=" + quota + " " + strconv.Itoa(periodUS), "memory.max=" + memory, "pids.max=" + pids}
	}
	return []string{"cpu.cfs_period_us=" + strconv.Itoa(periodUS), "cpu.cfs_quota_us=" + quota,
		"memory.limit_in_bytes=" + memory, "pids.max=" + pids}
}

// Remove deletes VM id's groups once their processes are gone. A group
// that never existed is not an error.
func (h Hierarchy) Remove(id string) error {
	var errs []error
	for _, dir := range h.Paths(id) {
		var err error
		// The VMM may still be exiting: its group empties a moment later.
		for range 100 {
			err = syscall.Rmdir(dir)
			if err == nil || errors.Is(err, syscall.ENOENT) {
				err = nil
				break
			}
			if !errors.Is(err, syscall.EBUSY) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// EmptyGroups lists the VM groups under the parent that hold no process,
// for removing what a crash left. Groups with processes are never listed:
// they may belong to another agent sharing the parent.
func (h Hierarchy) EmptyGroups() []string {
	seen := map[string]bool{}
	var out []string
	for _, d := range h.dirs() {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			// Dot names are not VMs' (the agent's own group is ".agent").
			if !e.IsDir() || seen[e.Name()] || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			procs, err := os.ReadFile(filepath.Join(d, e.Name(), "cgroup.procs"))
			if err == nil && len(strings.TrimSpace(string(procs))) == 0 {
				seen[e.Name()] = true
				out = append(out, e.Name())
			}
		}
	}
	return out
}

// VMMs confines each VMM to its VM's limits; it is the vmm.Confiner the
// drivers call as soon as a VMM process exists.
type VMMs struct {
	Hierarchy
	// OverheadMiB is the VMM's own memory on top of the guest's RAM.
	OverheadMiB int
}

var _ vmm.Confiner = VMMs{}

// Confine implements vmm.Confiner.
func (v VMMs) Confine(spec vmm.Spec, pid int) error {
	return v.Hierarchy.Confine(spec.ID, pid, ForVM(spec.VCPUs, spec.MemoryMiB, v.OverheadMiB))
}

// OOMKilled reports whether the kernel's OOM killer has ended a process of
// VM id's group at the group's memory limit.
func (h Hierarchy) OOMKilled(id string) bool {
	file := "memory.oom_control" // v1: "oom_kill N"
	if h.V2 {
		file = "memory.events" // v2: "oom_kill N"
	}
	data, err := os.ReadFile(filepath.Join(h.Dirs["memory"], id, file))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if n, ok := strings.CutPrefix(line, "oom_kill "); ok {
			return strings.TrimSpace(n) != "0"
		}
	}
	return false
}
