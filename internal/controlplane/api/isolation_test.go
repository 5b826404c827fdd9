package api

import (
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// A team never sees or touches another team's objects: every route with
// another team's capsule, key, template or team ID answers 404, exactly
// like an object that does not exist.
func TestTenantIsolation(t *testing.T) {
	c := newCP(t)
	owner := c.signup("owner@example.com") // platform admin (first user)
	victim := c.signup("victim@example.com")
	attacker := c.signup("attacker@example.com")
	victimKey := c.apiKey(victim)
	attackerKey := c.apiKey(attacker)
	_ = owner

	// The victim's objects, written straight to the database (no VM is needed to prove isolation).
	ctx := t.Context()
	sb := store.Sandbox{ID: "sb-victimcapsule01", TeamID: victim.teamID, Template: "minimal", Status: "running", VCPUs: 1, MemoryMB: 256}
	if _, err := c.st.InsertSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.InsertTemplate(ctx, store.Template{ID: "tpl-victimsnap", TeamID: &victim.teamID, Name: "victim-snap", Type: "snapshot"}); err != nil {
		t.Fatal(err)
	}
	var keys []struct {
		ID string `json:"id"`
	}
	c.want(c.do("GET", "/v1/api-keys", creds{jwt: victim.jwt}, nil), 200).json(t, &keys)

	build, err := c.st.InsertBuild(ctx, store.Build{ID: "bld-victimbuild0001", TeamID: victim.teamID, Name: "victim-build", Recipe: []byte(`{"name":"victim-build","commands":["true"]}`)}, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var ch struct{ ID string }
	c.want(c.do("POST", "/v1/channels", creds{jwt: victim.jwt}, map[string]any{"name": "victim", "provider": "webhook",
		"config": map[string]string{"url": "https://example.com/hook"}, "events": []string{"capsule.created"}}), 201).json(t, &ch)
	// Each path gets the victim's object of the path's kind.
	sub := func(path string) string {
		id := sb.ID
		if strings.HasPrefix(path, "/v1/builds/") {
			id = build.ID
		}
		r := strings.NewReplacer("{id}", id, "{selector}", "1", "{name}", "victim-snap", "{uid}", victim.userID, "{tag}", "x")
		return r.Replace(path)
	}
	missing := func(path string) string {
		id := "sb-doesnotexist0001"
		if strings.HasPrefix(path, "/v1/builds/") {
			id = "bld-doesnotexist001"
		}
		return strings.NewReplacer("{id}", id, "{selector}", "1", "{name}", "no-such-snap", "{uid}", "usr-nobody", "{tag}", "x").Replace(path)
	}
	bodies := map[string]any{
		"exec": map[string]any{"cmd": "true"}, "files/read": map[string]string{"path": "/etc/hostname"},
		"files/list": map[string]string{"path": "/"}, "files/mkdir": map[string]string{"path": "/tmp/x"},
		"files/remove": map[string]string{"path": "/tmp/x"}, "files/stream/read": map[string]string{"path": "/etc/hostname"},
	}
	checked := 0
	for _, rt := range routes {
		if rt.access != team || !strings.Contains(rt.path, "{") {
			continue
		}
		var body any
		for suffix, b := range bodies {
			if strings.HasSuffix(rt.path, suffix) {
				body = b
			}
		}
		for _, cr := range []creds{{key: attackerKey}, {jwt: attacker.jwt}} {
			got := c.do(rt.method, sub(rt.path), cr, body)
			if got.status != 404 {
				t.Errorf("%s %s as another team: %d %s", rt.method, rt.path, got.status, got.body)
				continue
			}
			none := c.do(rt.method, missing(rt.path), cr, body)
			if none.status != 404 || got.errorCode(t) != none.errorCode(t) {
				t.Errorf("%s %s: another team's object (%s) differs from a missing one (%d %s)", rt.method, rt.path, got.body, none.status, none.body)
			}
		}
		checked++
	}
	if checked < 22 {
		t.Fatalf("only %d capsule routes checked", checked)
	}
	// Snapshot of another team's capsule, listing, key revocation, team routes.
	c.want(c.do("POST", "/v1/snapshots", creds{key: attackerKey}, map[string]string{"sandbox_id": sb.ID, "name": "stolen"}), 404)
	var list []map[string]any
	c.want(c.do("GET", "/v1/capsules", creds{key: attackerKey}, nil), 200).json(t, &list)
	if len(list) != 0 {
		t.Fatalf("another team's capsules are listed: %v", list)
	}
	var tpls []map[string]any
	c.want(c.do("GET", "/v1/snapshots", creds{key: attackerKey}, nil), 200).json(t, &tpls)
	for _, tp := range tpls {
		if tp["name"] == "victim-snap" {
			t.Fatal("another team's snapshot is listed")
		}
	}
	c.want(c.do("DELETE", "/v1/api-keys/"+keys[0].ID, creds{jwt: attacker.jwt}, nil), 404)
	for _, m := range []string{"GET", "PATCH", "DELETE"} {
		c.want(c.do(m, "/v1/channels/"+ch.ID, creds{jwt: attacker.jwt}, map[string]any{"name": "pwned", "events": []string{"host.up"}}), 404)
	}
	c.want(c.do("PUT", "/v1/channels/"+ch.ID+"/config", creds{jwt: attacker.jwt}, map[string]any{"config": map[string]string{"url": "https://evil.example.com"}}), 404)
	var chans, builds []map[string]any
	c.want(c.do("GET", "/v1/channels", creds{jwt: attacker.jwt}, nil), 200).json(t, &chans)
	c.want(c.do("GET", "/v1/builds", creds{key: attackerKey}, nil), 200).json(t, &builds)
	if len(chans) != 0 || len(builds) != 0 {
		t.Fatalf("another team's channels or builds are listed: %v %v", chans, builds)
	}
	for _, m := range []string{"GET", "PATCH", "DELETE"} {
		c.want(c.do(m, "/v1/teams/"+victim.teamID, creds{jwt: attacker.jwt}, map[string]string{"name": "pwned"}), 404)
	}
	c.want(c.do("POST", "/v1/teams/"+victim.teamID+"/members", creds{jwt: attacker.jwt}, map[string]string{"email": "attacker@example.com"}), 404)
	c.want(c.do("POST", "/v1/auth/switch-team", creds{jwt: attacker.jwt}, map[string]string{"team_id": victim.teamID}), 404)
	var audit struct {
		Entries []map[string]any `json:"items"`
	}
	c.want(c.do("GET", "/v1/audit-logs", creds{jwt: attacker.jwt}, nil), 200).json(t, &audit)
	for _, e := range audit.Entries {
		if e["resource_id"] == keys[0].ID {
			t.Fatal("another team's audit entries are visible")
		}
	}
	// The victim still sees everything, and the victim's key still works.
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: victimKey}, nil), 200)
}
