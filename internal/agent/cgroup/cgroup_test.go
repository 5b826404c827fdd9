package cgroup

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const hybrid = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`

const unified = `25 24 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`

func TestDetect(t *testing.T) {
	h, err := Detect(strings.NewReader(hybrid), "/wrenn/")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"cpu": "/sys/fs/cgroup/cpu,cpuacct/wrenn", "memory": "/sys/fs/cgroup/memory/wrenn", "pids": "/sys/fs/cgroup/pids/wrenn"}
	if h.V2 || h.Parent != "wrenn" || !reflect.DeepEqual(h.Dirs, want) {
		t.Fatalf("hybrid layout: %+v", h)
	}
	h, err = Detect(strings.NewReader(unified), "wrenn/vms")
	if err != nil {
		t.Fatal(err)
	}
	if !h.V2 || h.Dirs["memory"] != "/sys/fs/cgroup/wrenn/vms" || len(h.Paths("sb-1")) != 1 {
		t.Fatalf("unified layout: %+v %v", h, h.Paths("sb-1"))
	}
	noPids := strings.ReplaceAll(hybrid, "rw,pids", "rw,freezer")
	if _, err := Detect(strings.NewReader(noPids), "wrenn"); err == nil || !strings.Contains(err.Error(), "pids") {
		t.Fatalf("missing pids controller: %v", err)
	}
	for _, bad := range []string{"", "/", "/.."} {
		if _, err := Detect(strings.NewReader(unified), bad); err == nil {
			t.Errorf("parent %q accepted", bad)
		}
	}
	if h, _ := Detect(strings.NewReader(unified), "a/../../b"); h.Dirs["cpu"] != "/sys/fs/cgroup/b" {
		t.Errorf("a parent climbed out of the hierarchy: %v", h.Dirs)
	}
}

func TestSettings(t *testing.T) {
	lim := ForVM(2, 512, 64)
	v1 := Hierarchy{}.Settings(lim)
	if want := []string{"cpu.cfs_period_us=100000", "cpu.cfs_quota_us=225000", "memory.limit_in_bytes=1140850688", "pids.max=136"}; !reflect.DeepEqual(v1, want) {
		t.Fatalf("v1: %v", v1)
	}
	v2 := Hierarchy{V2: true}.Settings(lim)
	if want := []string{"cpu.max=225000 100000", "memory.max=1140850688", "pids.max=136"}; !reflect.DeepEqual(v2, want) {
		t.Fatalf("v2: %v", v2)
	}
}

// TestConfineWritesAndRemoves runs against plain directories: it checks
// which files get which values, not the kernel (agenttest does that).
func TestConfineWritesAndRemoves(t *testing.T) {
	root := t.TempDir()
	h := Hierarchy{Parent: "wrenn", Dirs: map[string]string{}}
	for _, c := range controllers() {
		h.Dirs[c] = filepath.Join(root, c, "wrenn")
	}
	if err := h.Prepare(); err != nil {
		t.Fatal(err)
	}
	if err := h.Confine("../escape", 1, ForVM(1, 128, 64)); err == nil {
		t.Fatal("a group name with a path was accepted")
	}
	if err := h.Confine("sb-1", 4242, ForVM(1, 128, 64)); err != nil {
		t.Fatal(err)
	}
	read := func(c, f string) string {
		data, _ := os.ReadFile(filepath.Join(h.Dirs[c], "sb-1", f))
		return string(data)
	}
	if read("memory", "memory.limit_in_bytes") != "335544320" || read("cpu", "cgroup.procs") != "4242" || read("pids", "pids.max") != "132" {
		t.Fatalf("files: %q %q %q", read("memory", "memory.limit_in_bytes"), read("cpu", "cgroup.procs"), read("pids", "pids.max"))
	}
	// A group whose process list is empty is an orphan; one with a process is not.
	if got := h.EmptyGroups(); len(got) != 0 {
		t.Fatalf("empty groups %v", got)
	}
	for _, dir := range h.Paths("sb-1") {
		_ = os.WriteFile(filepath.Join(dir, "cgroup.procs"), nil, 0o644)
	}
	if got := h.EmptyGroups(); !reflect.DeepEqual(got, []string{"sb-1"}) {
		t.Fatalf("empty groups %v", got)
	}
}
