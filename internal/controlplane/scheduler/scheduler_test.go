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
