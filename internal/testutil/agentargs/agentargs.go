// Package agentargs gives the suites that start wrenn-agent (package
// agenttest, e2e) the flags an operator adds through WRENN_TEST_AGENT_ARGS,
// so the same tests run with another VMM: on a KVM host,
//
//	WRENN_TEST_AGENT_ARGS="--vmm firecracker --diff-snapshots --jailer /usr/local/bin/jailer"
//
// Without it the suites run QEMU, whatever the host has (an agent's own
// default, auto, would pick Firecracker where it can).
package agentargs

import (
	"path/filepath"
	"slices"
	"strings"
)

// Variable is the environment variable the flags come from.
const Variable = "WRENN_TEST_AGENT_ARGS"

// Args are an agent's extra flags, as WRENN_TEST_AGENT_ARGS gave them.
type Args []string

// Parse splits the variable's value on white space.
func Parse(value string) Args { return Args(strings.Fields(value)) }

// VMM is the VMM the agent is asked for: "qemu" unless --vmm says otherwise.
func (a Args) VMM() string {
	if v, ok := a.value("--vmm"); ok {
		return v
	}
	return "qemu"
}

// Jailed reports whether the agent runs its VMMs under a jailer.
func (a Args) Jailed() bool {
	_, ok := a.value("--jailer")
	return ok
}

// For are the flags for an agent on dir: --vmm always, and a jail base
// under dir for a jailed agent that names none, so the jails are on the
// WRENN_DIR's file system and a leftover VMM can be told by its root.
func (a Args) For(dir string) []string {
	out := slices.Clone(a)
	if _, ok := a.value("--vmm"); !ok {
		out = append([]string{"--vmm", "qemu"}, out...)
	}
	if a.Jailed() {
		if _, ok := a.value("--jailer-chroot"); !ok {
			out = append(out, "--jailer-chroot", filepath.Join(dir, "jail"))
		}
	}
	return out
}

// value finds a flag given as "--name v" or "--name=v" (the last one wins,
// as in package flag).
func (a Args) value(name string) (string, bool) {
	v, found := "", false
	for i, arg := range a {
		switch {
		case arg == name && i+1 < len(a):
			v, found = a[i+1], true
		case strings.HasPrefix(arg, name+"="):
			v, found = strings.TrimPrefix(arg, name+"="), true
		}
	}
	return v, found
}

// IsVMM reports whether a process, by its command line, root and working
// directories, is a VMM an agent on dir started, or a VMM's page-fault
// handler: a QEMU or direct Firecracker names files under dir; a jailed
// Firecracker runs chrooted in a jail under it; a handler runs in its
// VM's run directory. Firecracker may be installed under its release's
// name (firecracker-v1.x-x86_64).
func IsVMM(cmdline []byte, root, cwd, dir string) bool {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(args) == 0 {
		return false
	}
	prog := filepath.Base(args[0])
	vmm := strings.HasPrefix(prog, "qemu-system") || strings.HasPrefix(prog, "firecracker") ||
		len(args) > 1 && args[1] == "uffd-handler"
	if !vmm {
		return false
	}
	if strings.HasPrefix(root, dir+"/") || strings.HasPrefix(cwd, dir+"/") {
		return true
	}
	return slices.ContainsFunc(args, func(s string) bool { return strings.Contains(s, dir+"/") })
}
