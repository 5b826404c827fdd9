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
	// Template (its name on hosts) and DiskMB: a host with a ready warm
	// sandbox of this template and shape is preferred.
	Template string
	DiskMB   int
}

// warmFit says whether h has a ready warm-pool sandbox r can take, and
// how much memory its pools' members hold.
func warmFit(h store.HostLoad, r Request) (fit bool, poolMB int64) {
	for _, p := range h.WarmPools {
		poolMB += int64(p.Ready+p.Starting) * int64(p.MemoryMiB)
		if p.Template == r.Template && p.Ready > 0 && p.VCPUs == r.VCPUs && p.MemoryMiB == r.MemoryMB && (r.DiskMB == 0 || p.DiskMiB == r.DiskMB) {
			fit = true
		}
	}
	return fit, poolMB
}

// memoryShare is the part of a host's memory capsules may reserve; the
// rest stays for the host (agent, VMM overhead, page cache).
const memoryShare = 0.75

// vcpuOvercommit lets reserved vCPUs exceed physical cores: idle
// sandboxes use little CPU.
const vcpuOvercommit = 4

// Pick chooses the host that fits with a ready warm sandbox of the
// template, else the least-loaded: lowest reserved-memory share after
// placement (warm pools' members count, but one taken becomes the
// capsule), then fewest reserved vCPUs per core, then ID.
func Pick(hosts []store.HostLoad, r Request) (store.HostLoad, error) {
	type scored struct {
		h         store.HostLoad
		warm      bool
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
		warm, poolMB := warmFit(h, r)
		mem := float64(h.ReservedMB + poolMB + int64(r.MemoryMB))
		if warm {
			mem -= float64(r.MemoryMB) // the member it takes is already counted
		}
		vcpu := float64(h.ReservedVCPUs + int64(r.VCPUs))
		if mem > memCap || vcpu > vcpuCap {
			continue
		}
		fits = append(fits, scored{h: h, warm: warm, mem: mem / memCap, vcpu: vcpu / vcpuCap})
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
		if a.warm != b.warm {
			return a.warm
		}
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
