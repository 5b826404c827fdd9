package scheduler

import (
	"errors"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

func host(id string, memMB, cores int32, reservedMB, reservedVCPUs int64, tags ...string) store.HostLoad {
	return store.HostLoad{Host: store.Host{ID: id, MemoryMB: &memMB, CPUCores: &cores, Tags: tags}, ReservedMB: reservedMB, ReservedVCPUs: reservedVCPUs}
}

func TestPick(t *testing.T) {
	hosts := []store.HostLoad{
		host("host-a", 8192, 4, 4096, 4),
		host("host-b", 8192, 4, 1024, 2, "gpu"),
		host("host-c", 16384, 8, 8192, 1),
	}
	cases := []struct {
		name string
		req  Request
		want string
		err  error
	}{
		{"least memory share wins", Request{VCPUs: 1, MemoryMB: 512}, "host-b", nil},
		{"tags are constraints", Request{VCPUs: 1, MemoryMB: 512, Tags: []string{"gpu"}}, "host-b", nil},
		{"excluded hosts are skipped", Request{VCPUs: 1, MemoryMB: 512, Exclude: []string{"host-b"}}, "host-c", nil},
		{"pinned host", Request{VCPUs: 1, MemoryMB: 512, HostID: "host-a"}, "host-a", nil},
		{"too big for any host", Request{VCPUs: 1, MemoryMB: 20000}, "", ErrNoHost},
		{"too many vCPUs", Request{VCPUs: 40, MemoryMB: 128}, "", ErrNoHost},
		{"unknown tag", Request{VCPUs: 1, MemoryMB: 128, Tags: []string{"tpu"}}, "", ErrNoHost},
		{"memory cap is 75% of the host", Request{VCPUs: 1, MemoryMB: 2049, HostID: "host-a"}, "", ErrNoHost},
	}
	for _, c := range cases {
		got, err := Pick(hosts, c.req)
		if !errors.Is(err, c.err) || got.ID != c.want {
			t.Errorf("%s: got %q, %v; want %q, %v", c.name, got.ID, err, c.want, c.err)
		}
	}
	if _, err := Pick([]store.HostLoad{{Host: store.Host{ID: "host-unknown"}}}, Request{VCPUs: 1, MemoryMB: 1}); !errors.Is(err, ErrNoHost) {
		t.Errorf("a host with unknown specs was picked: %v", err)
	}
}

// BYOC hosts take only capsules that ask for them, and requests for them
// get nothing else; a pinned host is used whatever its type.
func TestPickBYOC(t *testing.T) {
	shared := host("host-shared", 8192, 4, 0, 0)
	own := host("host-own", 65536, 16, 0, 0)
	own.Type = "byoc"
	shared.Type = "regular"
	hosts := []store.HostLoad{shared, own}
	if got, err := Pick(hosts, Request{VCPUs: 1, MemoryMB: 512}); err != nil || got.ID != "host-shared" {
		t.Errorf("plain request: %q %v (the emptier BYOC host must not be used)", got.ID, err)
	}
	if got, err := Pick(hosts, Request{VCPUs: 1, MemoryMB: 512, BYOC: true}); err != nil || got.ID != "host-own" {
		t.Errorf("BYOC request: %q %v", got.ID, err)
	}
	if _, err := Pick([]store.HostLoad{shared}, Request{VCPUs: 1, MemoryMB: 512, BYOC: true}); !errors.Is(err, ErrNoHost) {
		t.Errorf("BYOC request without BYOC hosts: %v", err)
	}
	if got, err := Pick(hosts, Request{VCPUs: 1, MemoryMB: 512, HostID: "host-own"}); err != nil || got.ID != "host-own" {
		t.Errorf("pinned to a BYOC host: %q %v", got.ID, err)
	}
}

// A host with a ready warm sandbox of the template and shape goes first;
// pool members count against a host's memory, except the one taken.
func TestPickPrefersWarmPools(t *testing.T) {
	warm := host("host-warm", 8192, 4, 4096, 4)
	warm.WarmPools = []store.WarmPool{{Template: "minimal", Ready: 2, VCPUs: 1, MemoryMiB: 512, DiskMiB: 5120}}
	cold := host("host-cold", 8192, 4, 0, 0)
	hosts := []store.HostLoad{cold, warm}
	if got, _ := Pick(hosts, Request{VCPUs: 1, MemoryMB: 512, Template: "minimal", DiskMB: 5120}); got.ID != "host-warm" {
		t.Errorf("fitting request: %s, want host-warm", got.ID)
	}
	for name, r := range map[string]Request{
		"other template": {VCPUs: 1, MemoryMB: 512, Template: "base", DiskMB: 5120},
		"other shape":    {VCPUs: 2, MemoryMB: 512, Template: "minimal", DiskMB: 5120},
		"other disk":     {VCPUs: 1, MemoryMB: 512, Template: "minimal", DiskMB: 8192},
	} {
		if got, _ := Pick(hosts, r); got.ID != "host-cold" {
			t.Errorf("%s: %s, want the least-loaded host-cold", name, got.ID)
		}
	}
	// 4096 reserved + 2 members of 512 fill 5120 of the 6144 a host lends:
	// a 1536 MB capsule no longer fits there, a member it takes would.
	full := warm
	full.ID = "host-full"
	if _, err := Pick([]store.HostLoad{full}, Request{VCPUs: 1, MemoryMB: 1536, Template: "minimal"}); !errors.Is(err, ErrNoHost) {
		t.Errorf("pool members are not counted: %v", err)
	}
	if got, err := Pick([]store.HostLoad{full}, Request{VCPUs: 1, MemoryMB: 512, Template: "minimal"}); err != nil || got.ID != "host-full" {
		t.Errorf("taking a member: %v %v", got.ID, err)
	}
}
