package api

import (
	"fmt"
	"net/url"
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
