package api

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// One tenant cannot fill the shared hosts: each team's live capsules,
// and the vCPUs, memory and disk they hold, stay within the platform's
// quota (or the team's own, set by a platform admin); a create or resume
// past it is refused with 429 naming the limit, and nothing is placed.
// Signups from one address come slowly.
func TestTeamQuotas(t *testing.T) {
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Quotas = store.Quota{Capsules: 3, VCPUs: 4, MemoryMB: 4096, DiskMB: 20480}
		cfg.SignupsPerHour = 5
	})
	admin := c.signup("admin@example.com")
	tenant := c.signup("tenant@example.com")
	key := c.apiKey(tenant)
	// A host with room for much more than the quota.
	_, token := c.newHostToken(admin)
	body := withToken(token)
	body["cpu_cores"], body["memory_mb"] = 64, 262144
	var reg registered
	c.want(c.do("POST", "/v1/hosts/register", creds{}, body), 201).json(t, &reg)
	hostID := reg.Host.ID

	// The tenant's capsules as the database holds them (the host is a
	// stand-in: creates the API accepts fail there, which is fine here).
	live := func(status string, vcpus, memoryMB int32) string {
		sb, err := c.st.InsertSandbox(context.Background(), store.Sandbox{ID: ids.New("sb"), TeamID: tenant.teamID, HostID: &hostID,
			Template: "minimal", Status: status, VCPUs: vcpus, MemoryMB: memoryMB})
		if err != nil {
			t.Fatal(err)
		}
		return sb.ID
	}
	refused := func(what, path string, req map[string]any, limit string) {
		t.Helper()
		r := c.want(c.do("POST", path, creds{key: key}, req), 429)
		if r.errorCode(t) != "quota_exceeded" || !strings.Contains(string(r.body), limit) {
			t.Fatalf("%s: %s", what, r.body)
		}
	}
	count := func() int {
		var list []map[string]any
		c.want(c.do("GET", "/v1/capsules", creds{key: key}, nil), 200).json(t, &list)
		return len(list)
	}

	live("running", 2, 2048)
	refused("vCPUs", "/v1/capsules", map[string]any{"vcpus": 3}, "limit of 4 vCPUs")
	refused("memory", "/v1/capsules", map[string]any{"memory_mb": 2049}, "limit of 4096 MB of memory")
	refused("disk", "/v1/capsules", map[string]any{"disk_size_mb": 20481}, "limit of 20480 MB of disk")
	paused := live("paused", 2, 2048)
	live("running", 1, 512)
	refused("live capsules", "/v1/capsules", map[string]any{}, "limit of 3 live capsules")
	if n := count(); n != 3 {
		t.Fatalf("refused creates left %d capsules, want 3", n)
	}
	// Resuming needs room for the vCPUs again: 3 run, 2 more would pass 4.
	refused("resume", "/v1/capsules/"+paused+"/resume", nil, "limit of 4 vCPUs")

	// A platform admin raises the team's own limits; others cannot.
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/limits", creds{jwt: tenant.jwt}, map[string]any{"max_capsules": 100}), 403)
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/limits", creds{jwt: admin.jwt}, map[string]any{"max_capsules": -1}), 400)
	var limits struct {
		Limits store.Quota `json:"limits"`
		Usage  store.Usage `json:"usage"`
	}
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/limits", creds{jwt: admin.jwt},
		map[string]any{"max_capsules": 10, "max_vcpus": 0, "max_memory_mb": nil}), 200).json(t, &limits)
	if limits.Limits != (store.Quota{Capsules: 10, VCPUs: 0, MemoryMB: 4096, DiskMB: 20480}) || limits.Usage.Capsules != 3 || limits.Usage.VCPUs != 3 {
		t.Fatalf("limits after the override: %+v", limits)
	}
	c.want(c.do("GET", "/v1/teams/"+tenant.teamID+"/limits", creds{jwt: tenant.jwt}, nil), 200).json(t, &limits)
	if limits.Limits.Capsules != 10 {
		t.Fatalf("the team's view of its limits: %+v", limits)
	}
	c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"vcpus": 8, "memory_mb": 512}), 202) // vCPUs now unlimited
	refused("memory, still the default", "/v1/capsules", map[string]any{"memory_mb": 4096}, "limit of 4096 MB of memory")

	// Another team's quota is its own.
	other := c.signup("other@example.com")
	c.want(c.do("POST", "/v1/capsules", creds{key: c.apiKey(other)}, map[string]any{"vcpus": 4}), 202)

	// Accounts from one address: five an hour.
	for i := 0; ; i++ {
		r := c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": fmt.Sprintf("bulk%d@example.com", i), "password": "correct horse"})
		if r.status == 429 {
			if r.header.Get("Retry-After") == "" || i != 2 { // three signups above, two more fit
				t.Fatalf("signup %d refused (%s), Retry-After %q", i, r.body, r.header.Get("Retry-After"))
			}
			break
		}
		if r.status != 201 || i > 5 {
			t.Fatalf("signup %d: %d %s", i, r.status, r.body)
		}
	}
}
