// Package procfs reads the few /proc figures Wrenn reports: a process's
// resident memory, CPU time and status fields, and the host's memory.
package procfs

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// field returns a "Name:   value kB" line's value in bytes.
func field(path, name string) (int64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %s: %w", path, name, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("%s has no %s", path, name)
}

// Mem returns a /proc/meminfo figure in bytes, such as "MemTotal" or "MemAvailable".
func Mem(name string) (int64, error) { return field("/proc/meminfo", name) }

// RSS returns a process's resident memory in bytes (0 if it is gone).
func RSS(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	n, err := field(fmt.Sprintf("/proc/%d/status", pid), "VmRSS")
	if err != nil {
		return 0
	}
	return n
}

// CPUTicks returns the CPU time a process has used, user plus system, in
// clock ticks (1/100 s on Linux); 0 if it is gone.
func CPUTicks(pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may hold spaces; fields are counted after its ')'.
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	user, _ := strconv.ParseInt(f[11], 10, 64)
	system, _ := strconv.ParseInt(f[12], 10, 64)
	return user + system
}

// Status returns a raw field of a process's /proc/<pid>/status, such as
// "CapEff" (a hex mask; `capsh --decode` names it) or "NoNewPrivs".
func Status(pid int, name string) (string, error) {
	path := fmt.Sprintf("/proc/%d/status", pid)
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("%s has no %s", path, name)
}

// PSS returns a process's proportional set size in bytes: its private
// memory plus its share of pages it maps together with others (0 if it is
// gone).
func PSS(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	n, err := field(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss")
	if err != nil {
		return 0
	}
	return n
}
