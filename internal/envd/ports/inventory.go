package ports

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Port is one port a server in the guest listens on (GET /ports).
type Port struct {
	Port uint16 `json:"port"`
	// Addresses the server is bound to ("0.0.0.0", "::", "127.0.0.1"...).
	Addresses []string `json:"addresses"`
	// Forwarded: bound to loopback only, and reachable through envd's forward.
	Forwarded bool   `json:"forwarded"`
	PID       int    `json:"pid,omitempty"`
	Command   string `json:"command,omitempty"`
}

// maxProcesses bounds the process scan that names a port's owner.
const maxProcesses = 4096

// Inventory lists the ports servers listen on, leaving out the
// forwarder's own sockets and the ports in except, sorted by port.
func Inventory(procRoot string, f *Forwarder, except ...uint16) ([]Port, error) {
	ls, err := Listening(procRoot)
	if err != nil {
		return nil, err
	}
	forwarded := map[uint16]netip.AddrPort{}
	if f != nil {
		forwarded = f.Forwarded()
	}
	byPort := map[uint16]*Port{}
	inodes := map[uint64]*Port{}
	for _, l := range ls {
		if (f != nil && f.Own(l.Addr)) || slices.Contains(except, l.Addr.Port()) {
			continue
		}
		p := byPort[l.Addr.Port()]
		if p == nil {
			_, fw := forwarded[l.Addr.Port()]
			p = &Port{Port: l.Addr.Port(), Forwarded: fw}
			byPort[p.Port] = p
		}
		if a := l.Addr.Addr().String(); !slices.Contains(p.Addresses, a) {
			p.Addresses = append(p.Addresses, a)
		}
		if l.Inode != 0 {
			inodes[l.Inode] = p
		}
	}
	owners(procRoot, inodes)
	out := make([]Port, 0, len(byPort))
	for _, p := range byPort {
		slices.Sort(p.Addresses)
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b Port) int { return int(a.Port) - int(b.Port) })
	return out, nil
}

// owners names the process holding each socket inode, by the
// "socket:[inode]" links in /proc/<pid>/fd.
func owners(procRoot string, inodes map[uint64]*Port) {
	if len(inodes) == 0 {
		return
	}
	dirs, err := os.ReadDir(procRoot)
	if err != nil {
		return
	}
	seen := 0
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if seen++; seen > maxProcesses {
			return
		}
		fdDir := filepath.Join(procRoot, d.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			inode, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
			if err != nil {
				continue
			}
			if p := inodes[inode]; p != nil && p.PID == 0 {
				p.PID = pid
				if comm, err := os.ReadFile(filepath.Join(procRoot, d.Name(), "comm")); err == nil {
					p.Command = strings.TrimSpace(string(comm))
				}
			}
		}
	}
}
