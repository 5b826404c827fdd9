package api

import (
	"bufio"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/hostaddr"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// A self-signup tenant cannot make the control plane dial addresses of
// its choosing: BYOC is off until a platform admin enables it for the
// team, a BYOC host must register a public address (loopback, private,
// link-local and metadata addresses and the control plane's own are
// refused, the token left unspent) unless the operator allows the range,
// a team's BYOC hosts take only that team's capsules and only when asked,
// and what a dialled address answers never reaches the tenant.
func TestBYOCNeedsAnAdminAndAPublicAddress(t *testing.T) {
	own := netip.MustParseAddr("198.51.100.9")
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		// The operator allows one loopback address: the stand-in for a public BYOC agent.
		cfg.HostAddresses = hostaddr.Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}, Own: []netip.Addr{own}}
	})
	admin := c.signup("admin@example.com")
	tenant := c.signup("tenant@example.com")
	other := c.signup("other@example.com")
	byocHost := map[string]string{"type": "byoc"}

	// Off until an admin enables it; tenants cannot enable it themselves.
	if r := c.want(c.do("POST", "/v1/hosts", creds{jwt: tenant.jwt}, byocHost), 403); r.errorCode(t) != "byoc_disabled" {
		t.Fatal(string(r.body))
	}
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/byoc", creds{jwt: tenant.jwt}, map[string]bool{"enabled": true}), 403)
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/byoc", creds{jwt: admin.jwt}, map[string]string{}), 400)
	c.want(c.do("PUT", "/v1/admin/teams/team-nope/byoc", creds{jwt: admin.jwt}, map[string]bool{"enabled": true}), 404)
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/byoc", creds{jwt: admin.jwt}, map[string]bool{"enabled": true}), 204)
	var teams []struct {
		ID     string `json:"id"`
		IsBYOC bool   `json:"is_byoc"`
	}
	c.want(c.do("GET", "/v1/teams", creds{jwt: tenant.jwt}, nil), 200).json(t, &teams)
	if len(teams) != 1 || !teams[0].IsBYOC {
		t.Fatalf("teams: %+v", teams)
	}
	// Another team's id is not the tenant's to use.
	c.want(c.do("POST", "/v1/hosts", creds{jwt: other.jwt}, map[string]string{"type": "byoc", "team_id": tenant.teamID}), 404)

	var made struct {
		Host struct {
			ID string `json:"id"`
		} `json:"host"`
		RegistrationToken string `json:"registration_token"`
	}
	c.want(c.do("POST", "/v1/hosts", creds{jwt: tenant.jwt}, byocHost), 201).json(t, &made)
	register := func(address string) response {
		body := withToken(made.RegistrationToken)
		body["address"] = address
		return c.do("POST", "/v1/hosts/register", creds{}, body)
	}
	for _, bad := range []string{"127.0.0.1:55432", "[::1]:50051", "10.0.0.1:50051", "192.168.1.1:50051", "100.64.0.1:50051",
		"169.254.169.254:80", "0.0.0.0:50051", own.String() + ":8000", "metadata.google.internal:80"} {
		if r := c.want(register(bad), 400); !strings.Contains(string(r.body), "not allowed") {
			t.Errorf("%s: %s", bad, r.body)
		}
	}
	// The refusals spent nothing: the token still registers an allowed address.
	var reg registered
	c.want(register("127.0.0.2:1"), 201).json(t, &reg)

	tenantKey, otherKey := c.apiKey(tenant), c.apiKey(other)
	// Only BYOC hosts are online: another team never gets them.
	if r := c.want(c.do("POST", "/v1/capsules", creds{key: otherKey}, map[string]any{}), 503); r.errorCode(t) != "no_capacity" {
		t.Fatal(string(r.body))
	}
	c.want(c.do("POST", "/v1/capsules", creds{key: otherKey}, map[string]any{"byoc": true}), 503)
	c.want(c.do("POST", "/v1/capsules", creds{key: tenantKey}, map[string]any{"byoc": false}), 503) // shared hosts only: none here
	var placed struct {
		HostID string `json:"host_id"`
	}
	c.want(c.do("POST", "/v1/capsules", creds{key: tenantKey}, map[string]any{"byoc": true}), 202).json(t, &placed)
	if placed.HostID != made.Host.ID {
		t.Fatalf("placed on %q, want the tenant's host %s", placed.HostID, made.Host.ID)
	}
	// As upstream Wrenn's: a BYOC team's capsules go to its own hosts
	// unless it asks for shared ones.
	placed.HostID = ""
	c.want(c.do("POST", "/v1/capsules", creds{key: tenantKey}, map[string]any{}), 202).json(t, &placed)
	if placed.HostID != made.Host.ID {
		t.Fatalf("a BYOC team's capsule without byoc went to %q, want its host %s", placed.HostID, made.Host.ID)
	}
	// Disabled again: the team's hosts take nothing more.
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/byoc", creds{jwt: admin.jwt}, map[string]bool{"enabled": false}), 204)
	c.want(c.do("POST", "/v1/capsules", creds{key: tenantKey}, map[string]any{"byoc": true}), 503)

	// What a registered address answers is not passed to tenants: a
	// "host" whose address is a service that is no agent.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_, _ = bufio.NewReader(conn).ReadString('\n')
				_, _ = conn.Write([]byte("SECRET-BANNER 5.7.42-internal-database ready\r\n"))
			}()
		}
	}()
	c.want(c.do("PUT", "/v1/admin/teams/"+tenant.teamID+"/byoc", creds{jwt: admin.jwt}, map[string]bool{"enabled": true}), 204)
	c.want(c.do("POST", "/v1/hosts", creds{jwt: tenant.jwt}, byocHost), 201).json(t, &made)
	c.want(register(ln.Addr().String()), 201)
	// Take the first host out so the banner host is the one chosen.
	c.want(c.do("DELETE", "/v1/hosts/"+reg.Host.ID+"?force=true", creds{jwt: tenant.jwt}, nil), 204)
	r := c.do("POST", "/v1/capsules?wait=true", creds{key: tenantKey}, map[string]any{"byoc": true})
	if r.status != 502 || strings.Contains(string(r.body), "SECRET") || strings.Contains(string(r.body), "internal-database") {
		t.Fatalf("create on a host that is no agent: %d %s", r.status, r.body)
	}
	var list []struct {
		StatusReason string `json:"status_reason"`
	}
	c.want(c.do("GET", "/v1/capsules?status=error", creds{key: tenantKey}, nil), 200).json(t, &list)
	for _, sb := range list {
		if strings.Contains(sb.StatusReason, "SECRET") {
			t.Fatalf("the capsule's reason echoes the address's answer: %q", sb.StatusReason)
		}
	}
}
