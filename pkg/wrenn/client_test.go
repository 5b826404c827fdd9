package wrenn

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// Answers the API gives become typed errors with their code, message and
// Retry-After; requests carry the credentials and the filters.
func TestErrorsAndRequests(t *testing.T) {
	var seen *http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = r
		switch r.URL.Path {
		case "/v1/capsules/sb-missing":
			w.WriteHeader(404)
			_, _ = w.Write([]byte(`{"error":{"code":"not_found","message":"capsule not found"}}`))
		case "/v1/capsules/sb-busy":
			w.Header().Set("Retry-After", "3")
			w.WriteHeader(429)
			_, _ = w.Write([]byte(`{"error":{"code":"rate_limited","message":"slow down"}}`))
		case "/v1/capsules/sb-proxy":
			w.WriteHeader(502)
			_, _ = w.Write([]byte("bad gateway from a proxy"))
		default:
			_, _ = w.Write([]byte(`[]`))
		}
	}))
	defer srv.Close()
	c, err := New(srv.URL+"/", WithAPIKey("wrn_test"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = c.GetCapsule(ctx, "sb-missing")
	if !IsNotFound(err) || IsConflict(err) || err.(*APIError).Code != "not_found" || err.(*APIError).Message != "capsule not found" {
		t.Fatalf("404: %#v", err)
	}
	_, err = c.GetCapsule(ctx, "sb-busy")
	if ae, ok := err.(*APIError); !ok || ae.Status != 429 || ae.RetryAfter != 3*time.Second {
		t.Fatalf("429: %#v", err)
	}
	_, err = c.GetCapsule(ctx, "sb-proxy")
	if ae, ok := err.(*APIError); !ok || ae.Status != 502 || ae.Message != "bad gateway from a proxy" {
		t.Fatalf("non-JSON error: %#v", err)
	}
	if _, err := c.ListCapsules(ctx, ListCapsulesParams{Statuses: []string{"running", "paused"}, Metadata: map[string]string{"team": "a b"}}); err != nil {
		t.Fatal(err)
	}
	if q := seen.URL.Query(); q.Get("status") != "running,paused" || q.Get("metadata.team") != "a b" || seen.Header.Get("X-API-Key") != "wrn_test" {
		t.Fatalf("request: %s %v", seen.URL, seen.Header)
	}
	for _, bad := range []string{"", "localhost:8000", "ftp://x"} {
		if _, err := New(bad); err == nil {
			t.Errorf("base URL %q accepted", bad)
		}
	}
}
