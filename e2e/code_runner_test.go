package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// The code-runner-beta image, as upstream Wrenn's code interpreter uses
// it: a capsule of it serves Jupyter on port 8888 through the ingress to
// the team's key (the Python SDK sends X-API-Key), with a kernel started
// ahead; code sent over the kernel's channels WebSocket runs in it.
func TestCodeRunnerTemplate(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "code-runner-beta", Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(s.url, "http://")
	host := fmt.Sprintf("8888-%s.%s", sb.ID, addr)
	get := func(path string) (*http.Response, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url+path, nil)
		req.Host = host
		req.Header.Set("X-API-Key", s.key)
		return http.DefaultClient.Do(req)
	}
	// The server comes up with the capsule (a memory template of the image
	// has it running already; a cold boot starts it).
	var kernels []struct {
		ID             string `json:"id"`
		Name           string `json:"name"`
		ExecutionState string `json:"execution_state"`
	}
	for deadline := time.Now().Add(4 * time.Minute); ; time.Sleep(time.Second) {
		res, err := get("/api/kernels")
		if err == nil {
			kernels = nil
			if res.StatusCode == http.StatusOK {
				_ = json.NewDecoder(res.Body).Decode(&kernels)
			}
			res.Body.Close()
			if len(kernels) == 1 {
				break // the one it started ahead (the image's ready check waits for it)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no kernel through the ingress: %v %+v\n%s", err, kernels, mustSh(ctx, t, c, sb.ID, "tail -20 /var/log/wrenn-start.log"))
		}
	}
	// Without the team's key the port is closed.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url+"/api/kernels", nil)
	req.Host = host
	if res, err := http.DefaultClient.Do(req); err != nil || res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("Jupyter without credentials: %v %v", res.StatusCode, err)
	}

	ws, _, err := websocket.Dial(ctx, "ws://"+addr+"/api/kernels/"+kernels[0].ID+"/channels",
		&websocket.DialOptions{Host: host, HTTPHeader: http.Header{"X-API-Key": {s.key}}})
	if err != nil {
		t.Fatalf("the kernel's channels through the ingress: %v", err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(16 << 20)
	msg := map[string]any{
		"header":        map[string]any{"msg_id": "run-1", "msg_type": "execute_request", "username": "e2e", "session": "e2e", "version": "5.3", "date": time.Now().UTC().Format(time.RFC3339)},
		"parent_header": map[string]any{}, "metadata": map[string]any{}, "channel": "shell",
		"content": map[string]any{"code": "import numpy\nprint(int(numpy.arange(7).sum() * 2))", "silent": false, "store_history": true, "user_expressions": map[string]any{}, "allow_stdin": false},
	}
	data, _ := json.Marshal(msg)
	if err := ws.Write(ctx, websocket.MessageText, data); err != nil {
		t.Fatal(err)
	}
	var printed string
	for printed == "" {
		_, raw, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("reading the kernel's answer: %v", err)
		}
		var m struct {
			Header struct {
				MsgType string `json:"msg_type"`
			} `json:"header"`
			ParentHeader struct {
				MsgID string `json:"msg_id"`
			} `json:"parent_header"`
			Content struct {
				Name, Text, Ename, Evalue string
			} `json:"content"`
		}
		if json.Unmarshal(raw, &m) != nil || m.ParentHeader.MsgID != "run-1" {
			continue
		}
		switch m.Header.MsgType {
		case "stream":
			printed = m.Content.Text
		case "error":
			t.Fatalf("the kernel failed: %s: %s", m.Content.Ename, m.Content.Evalue)
		}
	}
	if printed != "42\n" {
		t.Fatalf("the kernel printed %q", printed)
	}
	if _, err := c.DestroyCapsule(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	s.nothingLeft()
}
