package api

import (
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// The capsule list pages instead of stopping silently: 1,005 capsules
// come back as a full page of 1,000 with X-Next-Token, then the rest.
func TestCapsuleListPages(t *testing.T) {
	c := newCP(t)
	u := c.signup("lister@example.com")
	key := c.apiKey(u)
	const total = maxCapsulePage + 5
	for i := range total {
		sb := store.Sandbox{ID: fmt.Sprintf("sb-page%013d", i), TeamID: u.teamID, Template: "minimal", Status: "paused", VCPUs: 1, MemoryMB: 256}
		if _, err := c.st.InsertSandbox(t.Context(), sb); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	var page []struct{ ID string }
	first := c.want(c.do("GET", "/v1/capsules", creds{key: key}, nil), 200)
	first.json(t, &page)
	next := first.header.Get("X-Next-Token")
	if len(page) != maxCapsulePage || next == "" {
		t.Fatalf("first page: %d capsules, next token %q", len(page), next)
	}
	for _, p := range page {
		seen[p.ID] = true
	}
	rest := c.want(c.do("GET", "/v1/capsules?next_token="+url.QueryEscape(next), creds{key: key}, nil), 200)
	rest.json(t, &page)
	for _, p := range page {
		if seen[p.ID] {
			t.Fatalf("%s on both pages", p.ID)
		}
		seen[p.ID] = true
	}
	if len(page) != 5 || rest.header.Get("X-Next-Token") != "" || len(seen) != total {
		t.Fatalf("second page: %d capsules, next %q; %d seen of %d", len(page), rest.header.Get("X-Next-Token"), len(seen), total)
	}
	small := c.want(c.do("GET", "/v1/capsules?limit=2", creds{key: key}, nil), 200)
	small.json(t, &page)
	if len(page) != 2 || small.header.Get("X-Next-Token") == "" {
		t.Fatalf("limit=2: %d capsules", len(page))
	}
	for _, bad := range []string{"limit=0", "limit=1001", "limit=x", "next_token=%21%21"} {
		c.want(c.do("GET", "/v1/capsules?"+bad, creds{key: key}, nil), 400)
	}
}

// Environment variables the agent would refuse are refused by the API,
// with the reason, instead of a 202 and a capsule that fails later.
func TestCapsuleEnvironmentIsCheckedUpFront(t *testing.T) {
	c := newCP(t)
	u := c.signup("envs@example.com")
	key := c.apiKey(u)
	for _, envs := range []map[string]string{{"MY-VAR": "x"}, {"1ST": "x"}, {"A": "nul\x00inside"}} {
		r := c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"envs": envs}), 400)
		if !strings.Contains(string(r.body), "environment variable") {
			t.Fatalf("%v: %s", envs, r.body)
		}
	}
}
