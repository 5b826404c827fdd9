package api

import (
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
	"github.com/wrenn/wrenn/internal/testutil/testcerts"
)

// Two real agents on one machine (disjoint network slot ranges): capsules
// spread over them by load, tags constrain placement, and a create whose
// chosen host has died moves to the other host without a half-made record.
func TestSchedulingAcrossTwoAgents(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	hostA, stopA := c.startAgent(admin, "--slots", "1-1000")
	hostB, _ := c.startAgent(admin, "--slots", "1001-2000")
	key := c.apiKey(admin)
	create := func(body map[string]any) capsuleOut {
		t.Helper()
		var sb capsuleOut
		body["memory_mb"] = 256
		c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, body), 201).json(t, &sb)
		return sb
	}
	var made []capsuleOut
	t.Cleanup(func() {
		for _, sb := range made {
			c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil)
		}
	})

	first := create(map[string]any{})
	second := create(map[string]any{})
	made = append(made, first, second)
	if first.HostID == second.HostID {
		t.Fatalf("both capsules on %s: the scheduler did not spread by load", first.HostID)
	}
	for _, sb := range []capsuleOut{first, second} {
		if out, code := c.exec(key, sb.ID, "echo", "on "+sb.HostID); code != 0 || out != "on "+sb.HostID+"\n" {
			t.Fatalf("exec on %s: %q %d", sb.HostID, out, code)
		}
	}

	// Tags are constraints: only B carries "fast-disk".
	c.want(c.do("POST", "/v1/hosts/"+hostB+"/tags", creds{jwt: admin.jwt}, map[string]string{"tag": "fast-disk"}), 204)
	tagged := create(map[string]any{"host_tags": []string{"fast-disk"}})
	made = append(made, tagged)
	if tagged.HostID != hostB {
		t.Fatalf("tagged capsule on %s, want %s", tagged.HostID, hostB)
	}
	c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"memory_mb": 256, "host_tags": []string{"gpu"}}), 503)

	// A is now the least loaded. Its agent dies (its heartbeat has not yet
	// been missed, so it is still scheduled): the create moves to B.
	onA := first
	if second.HostID == hostA {
		onA = second
	}
	c.want(c.do("DELETE", "/v1/capsules/"+onA.ID, creds{key: key}, nil), 202)
	stopA()
	moved := create(map[string]any{})
	made = append(made, moved)
	if moved.HostID != hostB {
		t.Fatalf("create after host A died: on %s, want %s", moved.HostID, hostB)
	}
	if out, _ := c.exec(key, moved.ID, "echo", "moved"); out != "moved\n" {
		t.Fatalf("moved capsule: %q", out)
	}
	var all []capsuleOut
	c.want(c.do("GET", "/v1/capsules", creds{key: key}, nil), 200).json(t, &all)
	for _, sb := range all {
		if sb.Status != "running" && sb.Status != "stopped" {
			t.Fatalf("a capsule was left %s: %+v", sb.Status, sb)
		}
	}
}

// An agent serving mutual TLS registers as https://; the control plane
// verifies it with the operator's CA and presents its own certificate.
func TestAgentOverMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.Issue(t, dir, "ca", testcerts.CA, nil)
	agentCert := testcerts.Issue(t, dir, "agent", testcerts.Server, ca)
	cpCert := testcerts.Issue(t, dir, "control-plane", testcerts.Client, ca)
	tlsCfg, err := agentclient.TLSConfig(ca.CertFile, cpCert.CertFile, cpCert.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Agents = &agentclient.Pool{TLS: tlsCfg}
	})
	admin := c.signup("admin@example.com")
	hostID, _ := c.startAgent(admin, "--tls-cert", agentCert.CertFile, "--tls-key", agentCert.KeyFile, "--tls-client-ca", ca.CertFile)
	var h struct{ Address string }
	c.want(c.do("GET", "/v1/hosts/"+hostID, creds{jwt: admin.jwt}, nil), 200).json(t, &h)
	if !strings.HasPrefix(h.Address, "https://127.0.0.1:") {
		t.Fatalf("registered address %q", h.Address)
	}
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &sb)
	if out, code := c.exec(key, sb.ID, "echo", "over tls"); out != "over tls\n" || code != 0 {
		t.Fatalf("exec over TLS: %q %d", out, code)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 202)
}
