package api

import (
	"reflect"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

func TestE2BEgress(t *testing.T) {
	no := false
	for name, c := range map[string]struct {
		internet *bool
		n        *e2bNetwork
		want     store.Egress
		bad      bool
	}{
		"nothing said":            {want: store.Egress{Mode: "allow_all"}},
		"no internet":             {internet: &no, want: store.Egress{Mode: "deny_all"}},
		"no internet but some":    {internet: &no, n: &e2bNetwork{AllowOut: []string{"1.1.1.1"}}, want: store.Egress{Mode: "allow_list", Allow: []string{"1.1.1.1"}}},
		"deny all, allow some":    {n: &e2bNetwork{DenyOut: []string{"0.0.0.0/0"}, AllowOut: []string{"8.8.8.0/24"}}, want: store.Egress{Mode: "allow_list", Allow: []string{"8.8.8.0/24"}}},
		"deny some":               {n: &e2bNetwork{DenyOut: []string{"203.0.113.0/24"}}, want: store.Egress{Mode: "allow_all", Deny: []string{"203.0.113.0/24"}}},
		"allow only (no effect)":  {n: &e2bNetwork{AllowOut: []string{"8.8.8.8"}}, want: store.Egress{Mode: "allow_all"}},
		"partial deny with allow": {n: &e2bNetwork{DenyOut: []string{"203.0.113.0/24"}, AllowOut: []string{"203.0.113.5"}}, bad: true},
		"a domain":                {n: &e2bNetwork{DenyOut: []string{"0.0.0.0/0"}, AllowOut: []string{"pypi.org"}}, bad: true},
	} {
		got, err := e2bEgress(c.internet, c.n)
		if (err != nil) != c.bad || (!c.bad && !reflect.DeepEqual(got, c.want)) {
			t.Errorf("%s: %+v %v", name, got, err)
		}
	}
}

func TestE2BMetadataQuery(t *testing.T) {
	// What the SDK sends for {"app": "a b", "k=": "v&"}: each pair
	// encoded, then the whole once more (the query parser undoes that).
	got, err := e2bMetadataQuery("app%3Da%2520b%26k%253D%3Dv%2526")
	if err != nil || !reflect.DeepEqual(got, map[string]string{"app": "a b", "k=": "v&"}) {
		t.Fatalf("%v %v", got, err)
	}
	if got, err := e2bMetadataQuery("a=1&b=2"); err != nil || len(got) != 2 {
		t.Fatalf("plain pairs: %v %v", got, err)
	}
	for _, bad := range []string{"novalue", "=v", "a=b=c"} {
		if _, err := e2bMetadataQuery(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCursorRoundTrip(t *testing.T) {
	c := store.Cursor{CreatedAt: time.Date(2026, 12, 1, 10, 0, 0, 123456000, time.UTC), ID: "sb-abc"}
	got, err := parseCursor(makeCursor(c))
	if err != nil || !got.CreatedAt.Equal(c.CreatedAt) || got.ID != c.ID {
		t.Fatalf("%+v %v", got, err)
	}
	for _, bad := range []string{"garbage!", "bm9zZXBhcmF0b3I", ""} {
		if _, err := parseCursor(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
