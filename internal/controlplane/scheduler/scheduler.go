// Package scheduler places capsules on hosts: pure logic over a snapshot
// of host loads, so it is tested without a database or agents.
package scheduler

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// ErrNoHost means no online host satisfies the request.
var ErrNoHost = errors.New("no online host has room for this capsule")

// Request is what a capsule needs.
type Request struct {
	VCPUs    int
	MemoryMB int
	Tags     []string // the host must carry every tag
	HostID   string   // pinned (a snapshot lives on one host); "" any
	Exclude  []string // hosts that already failed this create
	// BYOC asks for the team's own hosts only; otherwise only shared
	// hosts are used (a pinned host is used whatever its type).
	BYOC bool
}

// memoryShare is the part of a host's memory capsules may reserve; the
// rest stays for the host (agent, VMM overhead, page cache).
const memoryShare = 0.75

// vcpuOvercommit lets reserved vCPUs exceed physical cores: idle
// sandboxes use little CPU.
const vcpuOvercommit = 4

// Pick chooses the least-loaded host that fits: lowest reserved-memory
// share after placement, then fewest reserved vCPUs per core, then ID.
func Pick(hosts []store.HostLoad, r Request) (store.HostLoad, error) {
	type scored struct {
		h         store.HostLoad
		mem, vcpu float64
	}
	var fits []scored
	for _, h := range hosts {
		if slices.Contains(r.Exclude, h.ID) || (r.HostID != "" && h.ID != r.HostID) {
			continue
		}
		if r.HostID == "" && (h.Type == "byoc") != r.BYOC {
			continue
		}
		if !hasTags(h.Tags, r.Tags) || h.MemoryMB == nil || h.CPUCores == nil || *h.MemoryMB <= 0 || *h.CPUCores <= 0 {
			continue
		}
		memCap := float64(*h.MemoryMB) * memoryShare
		vcpuCap := float64(*h.CPUCores) * vcpuOvercommit
		mem := float64(h.ReservedMB + int64(r.MemoryMB))
		vcpu := float64(h.ReservedVCPUs + int64(r.VCPUs))
		if mem > memCap || vcpu > vcpuCap {
			continue
		}
		fits = append(fits, scored{h: h, mem: mem / memCap, vcpu: vcpu / vcpuCap})
	}
	if len(fits) == 0 {
		// Say what was asked, so "no room" and "no such tag" read differently.
		want := fmt.Sprintf("%d vCPU, %d MB", r.VCPUs, r.MemoryMB)
		if len(r.Tags) > 0 {
			want += ", tags " + strings.Join(r.Tags, ",")
		}
		if r.HostID != "" {
			want += ", on host " + r.HostID + " (where its snapshot is)"
		}
		if r.BYOC {
			want += ", on a BYOC host of the team"
		}
		return store.HostLoad{}, fmt.Errorf("%w (%s; %d online hosts)", ErrNoHost, want, len(hosts))
	}
	sort.Slice(fits, func(i, j int) bool {
		a, b := fits[i], fits[j]
		if a.mem != b.mem {
			return a.mem < b.mem
		}
		if a.vcpu != b.vcpu {
			return a.vcpu < b.vcpu
		}
		return a.h.ID < b.h.ID
	})
	return fits[0].h, nil
}

func hasTags(have, want []string) bool {
	for _, t := range want {
		if !slices.Contains(have, t) {
			return false
		}
	}
	return true
}
