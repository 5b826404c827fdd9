package api

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/internal/controlplane/notify"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// receiver is a webhook endpoint that records what it gets.
type receiver struct {
	mu     sync.Mutex
	fail   bool
	bodies [][]byte
	heads  []http.Header
	srv    *httptest.Server
}

func newReceiver(t *testing.T) *receiver {
	rc := &receiver{}
	rc.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		rc.mu.Lock()
		defer rc.mu.Unlock()
		if rc.fail {
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		}
		rc.bodies, rc.heads = append(rc.bodies, b), append(rc.heads, r.Header.Clone())
	}))
	t.Cleanup(rc.srv.Close)
	return rc
}

func (rc *receiver) got() ([][]byte, []http.Header) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([][]byte{}, rc.bodies...), append([]http.Header{}, rc.heads...)
}

// sseFrame is one parsed Server-Sent Event.
type sseFrame struct {
	id, event string
	data      sseEvent
}

// openSSE connects to an event stream and returns its frames as they come.
func openSSE(t *testing.T, url string, header http.Header) <-chan sseFrame {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header = header
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("event stream: %d %s", resp.StatusCode, b)
	}
	out := make(chan sseFrame, 100)
	go func() {
		defer resp.Body.Close()
		defer close(out)
		sc := bufio.NewScanner(resp.Body)
		var f sseFrame
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if f.id != "" {
					out <- f
				}
				f = sseFrame{}
			case strings.HasPrefix(line, "id: "):
				f.id = strings.TrimPrefix(line, "id: ")
			case strings.HasPrefix(line, "event: "):
				f.event = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				_ = json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &f.data)
			}
		}
	}()
	return out
}

func nextFrame(t *testing.T, frames <-chan sseFrame) sseFrame {
	t.Helper()
	select {
	case f, ok := <-frames:
		if !ok {
			t.Fatal("event stream closed")
		}
		return f
	case <-time.After(15 * time.Second):
		t.Fatal("no event within 15 s")
	}
	return sseFrame{}
}

// Lifecycle events reach a signed webhook (in order, retried after a
// failure) and the SSE stream (resumable by Last-Event-ID); channels are
// validated and private to their team.
func TestChannelsAndEvents(t *testing.T) {
	c := newCP(t)
	a := c.signup("owner@example.com")
	other := c.signup("stranger@example.com")
	key := c.apiKey(a)
	rc := newReceiver(t)
	ctx := t.Context()

	var ch struct {
		ID, Name, Provider, Secret string
		LastError                  string `json:"last_error"`
		Events                     []string
	}
	c.want(c.do("POST", "/v1/channels", creds{jwt: a.jwt}, map[string]any{"name": "ops", "provider": "webhook",
		"config": map[string]string{"url": rc.srv.URL}, "events": []string{"capsule.created", "capsule.running"}}), 201).json(t, &ch)
	if !strings.HasPrefix(ch.Secret, "whsec_") || ch.Provider != "webhook" {
		t.Fatalf("created channel: %+v", ch)
	}
	var listed []map[string]any
	c.want(c.do("GET", "/v1/channels", creds{jwt: a.jwt}, nil), 200).json(t, &listed)
	if len(listed) != 1 || listed[0]["secret"] != nil || listed[0]["config"] != nil {
		t.Fatalf("list must not show secrets: %+v", listed)
	}

	// Bad input, conflicts and other teams.
	for _, body := range []map[string]any{
		{"name": "x", "provider": "pager", "config": map[string]string{}, "events": []string{"capsule.created"}},
		{"name": "x", "provider": "webhook", "config": map[string]string{}, "events": []string{"capsule.created"}},
		{"name": "x", "provider": "webhook", "config": map[string]string{"url": "file:///etc/passwd"}, "events": []string{"capsule.created"}},
		{"name": "x", "provider": "webhook", "config": map[string]string{"url": rc.srv.URL}, "events": []string{"capsule.exploded"}},
		{"name": "x", "provider": "webhook", "config": map[string]string{"url": rc.srv.URL}, "events": []string{}},
		{"name": "", "provider": "webhook", "config": map[string]string{"url": rc.srv.URL}, "events": []string{"capsule.created"}},
	} {
		c.want(c.do("POST", "/v1/channels", creds{jwt: a.jwt}, body), 400).errorCode(t)
	}
	c.want(c.do("POST", "/v1/channels", creds{jwt: a.jwt}, map[string]any{"name": "ops", "provider": "slack",
		"config": map[string]string{"webhook_url": rc.srv.URL}, "events": []string{"host.up"}}), 409)
	for _, m := range []string{"GET", "PATCH", "DELETE"} {
		c.want(c.do(m, "/v1/channels/"+ch.ID, creds{jwt: other.jwt}, map[string]any{"name": "mine", "events": []string{"host.up"}}), 404)
	}
	c.want(c.do("PUT", "/v1/channels/"+ch.ID+"/config", creds{jwt: other.jwt}, map[string]any{"config": map[string]string{"url": rc.srv.URL}}), 404)

	// The test route sends one message and saves nothing.
	c.want(c.do("POST", "/v1/channels/test", creds{jwt: a.jwt}, map[string]any{"provider": "discord", "config": map[string]string{"webhook_url": rc.srv.URL}}), 200)
	if bodies, _ := rc.got(); len(bodies) != 1 || !strings.Contains(string(bodies[0]), "test notification") {
		t.Fatalf("test message: %q", bodies)
	}
	rc.mu.Lock()
	rc.bodies, rc.heads = nil, nil
	rc.mu.Unlock()

	// Subscribe to the stream, then make events happen.
	frames := openSSE(t, c.url+"/v1/events/stream", http.Header{"X-API-Key": {key}})
	if _, err := c.st.InsertSandbox(ctx, store.Sandbox{ID: "sb-events000000000001", TeamID: a.teamID, Template: "minimal", Status: "starting", VCPUs: 1, MemoryMB: 256}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.Transition(ctx, "sb-events000000000001", []string{"starting"}, "running", nil); err != nil {
		t.Fatal(err)
	}
	first, second := nextFrame(t, frames), nextFrame(t, frames)
	if first.event != "capsule.created" || second.event != "capsule.running" || second.data.Resource["id"] != "sb-events000000000001" ||
		second.data.Resource["type"] != "sandbox" || !strings.Contains(string(second.data.Sandbox), `"status":"running"`) {
		t.Fatalf("stream frames: %s %s (sandbox %s)", first.event, second.event, second.data.Sandbox)
	}
	// Another team's stream sees none of it; a reconnect with Last-Event-ID
	// gets what came after.
	resumed := openSSE(t, c.url+"/v1/events/stream", http.Header{"X-API-Key": {key}, "Last-Event-ID": {first.id}})
	if f := nextFrame(t, resumed); f.id != second.id {
		t.Fatalf("resume after %s: %+v", first.id, f)
	}
	otherFrames := openSSE(t, c.url+"/v1/events/stream?after=0", http.Header{"Authorization": {"Bearer " + other.jwt}})

	// Deliveries: in order, signed with the channel's secret.
	d := &notify.Dispatcher{Store: c.st, Client: notify.NewClient(true), Log: slog.New(slog.DiscardHandler)}
	if ran, err := d.Pass(ctx); err != nil || !ran {
		t.Fatalf("dispatch: %v %v", ran, err)
	}
	bodies, heads := rc.got()
	if len(bodies) != 2 {
		t.Fatalf("webhook got %d deliveries: %q", len(bodies), bodies)
	}
	for i, want := range []string{"capsule.created", "capsule.running"} {
		var m notify.Message
		_ = json.Unmarshal(bodies[i], &m)
		if m.Event != want || heads[i].Get("X-Wrenn-Event") != want || m.ResourceID != "sb-events000000000001" {
			t.Fatalf("delivery %d: %s %v", i, bodies[i], heads[i])
		}
		if err := notify.Verify(ch.Secret, heads[i].Get(notify.SignatureHeader), heads[i].Get(notify.TimestampHeader), bodies[i], 5*time.Minute, time.Now()); err != nil {
			t.Fatalf("delivery %d signature: %v", i, err)
		}
	}

	// A failing endpoint is retried later, and nothing is skipped.
	rc.mu.Lock()
	rc.fail = true
	rc.mu.Unlock()
	if _, err := c.st.Transition(ctx, "sb-events000000000001", []string{"running"}, "paused", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.Transition(ctx, "sb-events000000000001", []string{"paused"}, "running", nil); err != nil {
		t.Fatal(err)
	}
	if ran, err := d.Pass(ctx); err != nil || !ran {
		t.Fatal(ran, err)
	}
	c.want(c.do("GET", "/v1/channels/"+ch.ID, creds{jwt: a.jwt}, nil), 200).json(t, &ch)
	if !strings.Contains(ch.LastError, "503") {
		t.Fatalf("failure not recorded: %+v", ch)
	}
	rc.mu.Lock()
	rc.fail = false
	rc.mu.Unlock()
	if _, err := c.st.Pool.Exec(ctx, "UPDATE channels SET next_attempt_at = now() WHERE id = $1", ch.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if bodies, _ = rc.got(); len(bodies) != 3 || !strings.Contains(string(bodies[2]), `"capsule.running"`) {
		t.Fatalf("after recovery (paused is not subscribed, running is): %q", bodies)
	}
	select {
	case f := <-otherFrames:
		t.Fatalf("another team saw %+v", f)
	case <-time.After(300 * time.Millisecond):
	}

	// Browser tickets: single use; admin tickets only for platform admins.
	var tk struct{ Ticket string }
	c.want(c.do("POST", "/v1/events/token", creds{key: key}, nil), 200).json(t, &tk)
	openSSE(t, c.url+"/v1/events/stream?ticket="+tk.Ticket, http.Header{})
	c.want(c.do("GET", "/v1/events/stream?ticket="+tk.Ticket, creds{}, nil), 401)
	c.want(c.do("GET", "/v1/events/stream", creds{}, nil), 401)
	c.want(c.do("POST", "/v1/admin/events/token", creds{jwt: other.jwt}, nil), 403)
	c.want(c.do("POST", "/v1/admin/events/token", creds{jwt: a.jwt}, nil), 200).json(t, &tk)
	c.want(c.do("GET", "/v1/events/stream?ticket="+tk.Ticket, creds{}, nil), 401) // admin tickets are for the admin stream
	c.want(c.do("POST", "/v1/admin/events/token", creds{jwt: a.jwt}, nil), 200).json(t, &tk)
	all := openSSE(t, c.url+"/v1/admin/events/stream?ticket="+tk.Ticket+"&after=0", http.Header{})
	if f := nextFrame(t, all); f.event != "capsule.created" {
		t.Fatalf("admin stream: %+v", f)
	}

	// A ticket also opens a capsule's WebSocket (browsers cannot send
	// headers there): the one it was issued for, once; without an upgrade
	// it is no credential.
	pty := map[string]string{"path": "/v1/capsules/sb-events000000000001/pty"}
	c.want(c.do("POST", "/v1/events/token", creds{key: key}, map[string]string{"path": "/v1/capsules"}), 400)
	c.want(c.do("POST", "/v1/events/token", creds{key: key}, pty), 200).json(t, &tk)
	c.want(c.do("GET", "/v1/capsules/sb-events000000000001/pty?ticket="+tk.Ticket, creds{}, nil), 401)
	base := strings.Replace(c.url, "http", "ws", 1)
	// An event-stream ticket, or one for another stream, opens nothing else (each try spends it).
	for _, path := range []string{"/v1/capsules", "/v1/capsules/sb-events000000000001/exec/stream", "/v1/capsules/sb-events000000000002/pty"} {
		for _, body := range []any{nil, pty} {
			c.want(c.do("POST", "/v1/events/token", creds{key: key}, body), 200).json(t, &tk)
			if _, resp, err := websocket.Dial(ctx, base+path+"?ticket="+tk.Ticket, nil); err == nil || resp == nil || resp.StatusCode != 401 {
				t.Fatalf("a ticket for another stream opened %s: %v %v", path, resp, err)
			}
		}
	}
	c.want(c.do("POST", "/v1/events/token", creds{key: key}, pty), 200).json(t, &tk)
	wsURL := base + "/v1/capsules/sb-events000000000001/pty?ticket=" + tk.Ticket
	if _, resp, err := websocket.Dial(ctx, wsURL, nil); err == nil || resp == nil || resp.StatusCode != 409 {
		t.Fatalf("ticketed WebSocket should pass authentication and meet the capsule's state (409): %v %v", resp, err)
	}
	if _, resp, err := websocket.Dial(ctx, wsURL, nil); err == nil || resp == nil || resp.StatusCode != 401 {
		t.Fatalf("a used ticket opened a WebSocket: %v %v", resp, err)
	}

	// Update, rotate, delete.
	c.want(c.do("PATCH", "/v1/channels/"+ch.ID, creds{jwt: a.jwt}, map[string]any{"name": "ops-2", "events": []string{"capsule.destroyed"}}), 200).json(t, &ch)
	if ch.Name != "ops-2" || len(ch.Events) != 1 {
		t.Fatalf("update: %+v", ch)
	}
	old := ch.Secret
	c.want(c.do("PUT", "/v1/channels/"+ch.ID+"/config", creds{jwt: a.jwt}, map[string]any{"config": map[string]string{"url": rc.srv.URL}}), 200).json(t, &ch)
	if ch.Secret == "" || ch.Secret == old {
		t.Fatalf("rotation must issue a new secret: %q", ch.Secret)
	}
	c.want(c.do("DELETE", "/v1/channels/"+ch.ID, creds{jwt: a.jwt}, nil), 204)
	c.want(c.do("GET", "/v1/channels/"+ch.ID, creds{jwt: a.jwt}, nil), 404)
}
