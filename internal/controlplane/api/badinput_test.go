package api

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Every route, fed bad input, answers a 4xx JSON error: no credentials,
// malformed and wrongly typed JSON, an oversized body, and path values
// that are garbage, too long or hostile. Never a 5xx, never a hang.
func TestBadInputOnEveryRoute(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	key := c.apiKey(admin)
	hostID, _ := c.newHostToken(admin)
	ctx := t.Context()
	// A capsule that is paused on no host: routes get past the lookup and
	// refuse on state or input, without needing a VM.
	if _, err := c.st.InsertSandbox(ctx, store.Sandbox{ID: "sb-badinput000000001", TeamID: admin.teamID, Template: "minimal", Status: "paused", VCPUs: 1, MemoryMB: 256}); err != nil {
		t.Fatal(err)
	}
	var ch struct{ ID string }
	c.want(c.do("POST", "/v1/channels", creds{jwt: admin.jwt}, map[string]any{"name": "n", "provider": "webhook",
		"config": map[string]string{"url": "https://example.com/hook"}, "events": []string{"host.up"}}), 201).json(t, &ch)

	own := func(path string) string {
		id := "sb-badinput000000001"
		switch {
		case strings.HasPrefix(path, "/v1/teams/"):
			id = admin.teamID
		case strings.HasPrefix(path, "/v1/hosts/"):
			id = hostID
		case strings.HasPrefix(path, "/v1/channels/"):
			id = ch.ID
		}
		return strings.NewReplacer("{id}", id, "{uid}", admin.userID, "{selector}", "1", "{name}", "snap", "{tag}", "t").Replace(path)
	}
	hostile := []string{"..%2F..%2Fetc%2Fpasswd", strings.Repeat("a", 400), "%00", "sb-%E2%80%AE", "%27%3B--"}

	credsFor := func(a access) creds {
		switch a {
		case user:
			return creds{jwt: admin.jwt}
		case team:
			return creds{key: key}
		}
		return creds{}
	}
	send := func(method, path string, cr creds, body []byte) response {
		t.Helper()
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, c.url+path, rd)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if cr.jwt != "" {
			req.Header.Set("Authorization", "Bearer "+cr.jwt)
		}
		if cr.key != "" {
			req.Header.Set("X-API-Key", cr.key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return response{status: resp.StatusCode, body: data, header: resp.Header}
	}
	check := func(what, method, path string, r response) {
		t.Helper()
		if r.status < 400 || r.status > 499 {
			t.Errorf("%s %s (%s): status %d: %.200s", method, path, what, r.status, r.body)
			return
		}
		r.errorCode(t)
	}

	huge := append(append([]byte(`{"name":"`), bytes.Repeat([]byte("x"), 2<<20)...), `"}`...)
	bodies := map[string][]byte{"malformed JSON": []byte(`{"name": `), "wrong type": []byte(`["a", 1]`), "wrong field types": []byte(`{"name": 7, "cmd": [], "path": {}, "email": false, "events": "x", "config": 3, "template": 5,
		"vcpus": "x", "memory_mb": "x", "token": 5, "team_id": 5, "sandbox_id": 5, "type": 5, "tag": 5, "role": 5, "provider": 5,
		"new_password": 5, "password": 5, "current_password": 5, "address": 5, "refresh_token": 5, "admin": "x", "active": "x"}`),
		"NUL in strings": []byte(`{"name": "a\u0000b", "email": "a\u0000@example.com", "path": "/tmp/a\u0000", "cmd": "x\u0000",
		"template": "m\u0000", "team_id": "t\u0000", "sandbox_id": "sb-\u0000", "tag": "t\u0000", "token": "t\u0000", "type": "regular",
		"events": ["host.up"], "provider": "webhook", "config": {"url": "https://example.com/\u0000"}}`), "oversized": huge}
	for _, rt := range routes {
		// No credentials at all.
		if rt.access != public {
			check("no credentials", rt.method, own(rt.path), send(rt.method, own(rt.path), creds{}, nil))
		}
		// Bodies that are not what the route reads.
		if rt.method == "POST" || rt.method == "PATCH" || rt.method == "PUT" {
			for what, b := range bodies {
				r := send(rt.method, own(rt.path), credsFor(rt.access), b)
				// Routes that take no body may succeed; they must still not fail on it.
				if r.status >= 200 && r.status < 300 {
					continue
				}
				check(what, rt.method, own(rt.path), r)
			}
		}
		// Hostile path values.
		if strings.Contains(rt.path, "{") {
			for _, v := range hostile {
				path := strings.NewReplacer("{id}", v, "{uid}", v, "{selector}", v, "{name}", v, "{tag}", v).Replace(rt.path)
				check("hostile path "+v[:min(len(v), 12)], rt.method, path, send(rt.method, path, credsFor(rt.access), []byte(`{}`)))
			}
		}
	}
}
