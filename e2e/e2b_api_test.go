package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// e2bCall calls the E2B API with a key and answers the status, the
// decoded body and the headers.
func e2bCall(t *testing.T, base, key, method, path string, body any) (int, map[string]any, []any, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, base+path, rd)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("X-API-Key", key)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	var obj map[string]any
	var arr []any
	if len(data) > 0 && data[0] == '[' {
		_ = json.Unmarshal(data, &arr)
	} else {
		_ = json.Unmarshal(data, &obj)
	}
	return res.StatusCode, obj, arr, res.Header
}

// E2B's rules on the E2B API: a timeout is an absolute deadline (the
// sandbox is killed at it, or paused with autoPause), whatever its
// activity; lists page with X-Next-Token and filter by metadata and
// state; errors carry their status in the body; what the control plane
// does not do is refused by name, not ignored.
func TestE2BAPISemantics(t *testing.T) {
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	user, _ := wrenn.New(s.url, wrenn.WithToken(s.token))
	k, err := user.CreateAPIKey(ctx, "e2b", wrenn.KeyFormatE2B)
	if err != nil {
		t.Fatal(err)
	}
	key := k.Key

	// Errors: E2B's shape, the status in the body too.
	code, body, _, _ := e2bCall(t, s.url, "", "GET", "/v2/sandboxes", nil)
	if code != 401 || body["code"] != float64(401) || body["message"] == "" {
		t.Fatalf("no key: %d %v", code, body)
	}
	code, body, _, _ = e2bCall(t, s.url, key, "GET", "/sandboxes/sb-nosuchsandbox", nil)
	if code != 404 || body["code"] != float64(404) {
		t.Fatalf("unknown sandbox: %d %v", code, body)
	}
	for name, req := range map[string]map[string]any{
		"a template that does not exist": {"templateID": "no-such-template"},
		"volume mounts":                  {"volumeMounts": []map[string]string{{"name": "v", "path": "/mnt"}}},
		"a domain in allowOut":           {"network": map[string]any{"denyOut": []string{"0.0.0.0/0"}, "allowOut": []string{"example.com"}}},
		"maskRequestHost":                {"network": map[string]any{"maskRequestHost": "x.example.com"}},
		"a negative timeout":             {"timeout": -1},
	} {
		code, body, _, _ := e2bCall(t, s.url, key, "POST", "/v2/sandboxes", req)
		if code/100 != 4 || body["code"] != float64(code) || body["message"] == "" {
			t.Errorf("%s: %d %v", name, code, body)
		}
	}

	create := func(req map[string]any) string {
		t.Helper()
		req["templateID"] = "base"
		code, body, _, _ := e2bCall(t, s.url, key, "POST", "/v2/sandboxes", req)
		if code != 201 || body["envdVersion"] == "" || body["envdAccessToken"] == "" || body["sandboxID"] == nil {
			t.Fatalf("create %v: %d %v", req, code, body)
		}
		return body["sandboxID"].(string)
	}
	killed := create(map[string]any{"timeout": 15, "metadata": map[string]string{"case": "kill", "set": "deadline"}})
	paused := create(map[string]any{"timeout": 15, "autoPause": true, "metadata": map[string]string{"case": "pause", "set": "deadline"}})
	c := s.client()
	// Activity does not move a deadline.
	for i := 0; i < 3; i++ {
		_, _ = c.Exec(ctx, killed, wrenn.ExecParams{Cmd: "true"})
	}

	// Lists: by metadata (E2B's encoding), by state, a page at a time.
	md := url.QueryEscape(url.Values{"set": {"deadline"}}.Encode())
	code, _, page1, h := e2bCall(t, s.url, key, "GET", "/v2/sandboxes?limit=1&state=running&metadata="+md, nil)
	if code != 200 || len(page1) != 1 || h.Get("X-Next-Token") == "" {
		t.Fatalf("first page: %d %v next=%q", code, page1, h.Get("X-Next-Token"))
	}
	code, _, page2, h2 := e2bCall(t, s.url, key, "GET", "/v2/sandboxes?limit=1&state=running&metadata="+md+"&nextToken="+url.QueryEscape(h.Get("X-Next-Token")), nil)
	if code != 200 || len(page2) != 1 || h2.Get("X-Next-Token") != "" {
		t.Fatalf("second page: %d %v next=%q", code, page2, h2.Get("X-Next-Token"))
	}
	ids := map[string]bool{page1[0].(map[string]any)["sandboxID"].(string): true, page2[0].(map[string]any)["sandboxID"].(string): true}
	if !ids[killed] || !ids[paused] {
		t.Fatalf("the pages hold %v", ids)
	}
	if code, _, _, _ := e2bCall(t, s.url, key, "GET", "/v2/sandboxes?nextToken=garbage", nil); code != 400 {
		t.Fatalf("a bad token: %d", code)
	}
	one := url.QueryEscape(url.Values{"case": {"pause"}}.Encode())
	if _, _, only, _ := e2bCall(t, s.url, key, "GET", "/v2/sandboxes?metadata="+one, nil); len(only) != 1 || only[0].(map[string]any)["sandboxID"] != paused {
		t.Fatalf("metadata filter: %v", only)
	}

	// At the deadline: one is killed, the other paused.
	deadline := time.Now().Add(90 * time.Second)
	for {
		kc, _, _, _ := e2bCall(t, s.url, key, "GET", "/sandboxes/"+killed, nil)
		pc, pbody, _, _ := e2bCall(t, s.url, key, "GET", "/sandboxes/"+paused, nil)
		if kc == 404 && pc == 200 && pbody["state"] == "paused" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("past the deadline: killed one %d, paused one %d %v", kc, pc, pbody)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if _, _, paged, _ := e2bCall(t, s.url, key, "GET", "/v2/sandboxes?state=paused&metadata="+md, nil); len(paged) != 1 {
		t.Fatalf("paused list: %v", paged)
	}
	// Pausing a paused sandbox: 409 in the body.
	if code, body, _, _ := e2bCall(t, s.url, key, "POST", "/sandboxes/"+paused+"/pause", nil); code != 409 || body["code"] != float64(409) {
		t.Fatalf("pause twice: %d %v", code, body)
	}
	// Connect resumes it (201) with a new deadline; connect again is 200 and only extends.
	code, body, _, _ = e2bCall(t, s.url, key, "POST", "/v2/sandboxes/"+paused+"/connect", map[string]any{"timeout": 120})
	if code != 201 || body["sandboxID"] != paused {
		t.Fatalf("connect a paused sandbox: %d %v", code, body)
	}
	_, info, _, _ := e2bCall(t, s.url, key, "GET", "/sandboxes/"+paused, nil)
	end1, _ := time.Parse(time.RFC3339Nano, info["endAt"].(string))
	if code, _, _, _ := e2bCall(t, s.url, key, "POST", "/v2/sandboxes/"+paused+"/connect", map[string]any{"timeout": 10}); code != 200 {
		t.Fatalf("connect a running sandbox: %d", code)
	}
	_, info, _, _ = e2bCall(t, s.url, key, "GET", "/sandboxes/"+paused, nil)
	if end2, _ := time.Parse(time.RFC3339Nano, info["endAt"].(string)); !end2.Equal(end1) || time.Until(end1) < 100*time.Second {
		t.Fatalf("connect with a shorter timeout moved the deadline from %v to %v", end1, end2)
	}
	// setTimeout sets it, earlier or later.
	if code, _, _, _ := e2bCall(t, s.url, key, "POST", "/sandboxes/"+paused+"/timeout", map[string]any{"timeout": 30}); code != 204 {
		t.Fatalf("timeout: %d", code)
	}
	_, info, _, _ = e2bCall(t, s.url, key, "GET", "/sandboxes/"+paused, nil)
	if end3, _ := time.Parse(time.RFC3339Nano, info["endAt"].(string)); time.Until(end3) > 31*time.Second {
		t.Fatalf("setTimeout(30) left the deadline at %v", end3)
	}
	// The same capsule in /v1, with its metadata.
	cp, err := c.GetCapsule(ctx, paused)
	if err != nil || cp.Metadata["case"] != "pause" || !cp.Public {
		t.Fatalf("through /v1: %+v %v", cp, err)
	}
	// Templates by name, and base.
	if code, body, _, _ := e2bCall(t, s.url, key, "GET", "/templates/aliases/base", nil); code != 200 || body["templateID"] == "" {
		t.Fatalf("alias base: %d %v", code, body)
	}
	if code, _, list, _ := e2bCall(t, s.url, key, "GET", "/templates", nil); code != 200 || len(list) == 0 {
		t.Fatalf("templates: %d %v", code, list)
	}
	if code, _, _, _ := e2bCall(t, s.url, key, "DELETE", "/sandboxes/"+paused, nil); code != 204 {
		t.Fatalf("kill: %d", code)
	}
	if code, body, _, _ := e2bCall(t, s.url, key, "DELETE", "/sandboxes/"+paused, nil); code != 404 || body["code"] != float64(404) {
		t.Fatalf("kill twice: %d %v", code, body)
	}
	s.nothingLeft()
}
