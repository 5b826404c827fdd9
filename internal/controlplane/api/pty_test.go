package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// terminal is a test client of /v1/capsules/{id}/pty.
type terminal struct {
	t      *testing.T
	ws     *websocket.Conn
	output strings.Builder
	tag    string
	exit   *int
}

func dialPTY(t *testing.T, c *cp, key, id string) *terminal {
	t.Helper()
	ws, _, err := websocket.Dial(t.Context(), strings.Replace(c.url, "http", "ws", 1)+"/v1/capsules/"+id+"/pty",
		&websocket.DialOptions{HTTPHeader: http.Header{"X-API-Key": {key}}})
	if err != nil {
		t.Fatalf("dial pty: %v", err)
	}
	return &terminal{t: t, ws: ws}
}

func (tm *terminal) send(msg map[string]any) {
	tm.t.Helper()
	b, _ := json.Marshal(msg)
	if err := tm.ws.Write(tm.t.Context(), websocket.MessageText, b); err != nil {
		tm.t.Fatalf("pty write: %v", err)
	}
}

func (tm *terminal) input(s string) {
	tm.send(map[string]any{"type": "input", "data": base64.StdEncoding.EncodeToString([]byte(s))})
}

// waitFor reads messages until the output holds want; an empty want waits
// for the process to exit.
func (tm *terminal) waitFor(want string) {
	tm.t.Helper()
	ctx, cancel := context.WithTimeout(tm.t.Context(), 30*time.Second)
	defer cancel()
	done := func() bool {
		if want == "" {
			return tm.exit != nil
		}
		return strings.Contains(tm.output.String(), want)
	}
	for !done() {
		_, raw, err := tm.ws.Read(ctx)
		if err != nil {
			tm.t.Fatalf("waiting for %q: %v; output so far %q", want, err, tm.output.String())
		}
		var ev ptyEvent
		if err := json.Unmarshal(raw, &ev); err != nil {
			tm.t.Fatalf("bad message %s", raw)
		}
		switch ev.Type {
		case "started":
			tm.tag = ev.Tag
		case "output":
			b, err := base64.StdEncoding.DecodeString(ev.Data)
			if err != nil {
				tm.t.Fatalf("output not base64: %q", ev.Data)
			}
			tm.output.Write(b)
		case "exit":
			code := int(*ev.ExitCode)
			tm.exit = &code
			if want != "" && !done() {
				tm.t.Fatalf("exited with %d before %q appeared: %q", code, want, tm.output.String())
			}
		case "error":
			tm.t.Fatalf("pty error: %s (output %q)", ev.Data, tm.output.String())
		}
	}
}

// checkPTY drives a terminal session through a real capsule: size, input,
// resize, drop and rejoin, exit code.
func checkPTY(t *testing.T, c *cp, key, id string) {
	tm := dialPTY(t, c, key, id)
	tm.send(map[string]any{"type": "start", "cols": 100, "rows": 30, "envs": map[string]string{"GREETING": "hi"}})
	tm.input("stty size; echo \"$GREETING $TERM mark-$((6*7))\"\n")
	tm.waitFor("hi xterm-256color mark-42")
	if !strings.Contains(tm.output.String(), "30 100") || tm.tag == "" {
		t.Fatalf("terminal size or tag: tag %q output %q", tm.tag, tm.output.String())
	}
	tm.send(map[string]any{"type": "resize", "cols": 120, "rows": 40})
	tm.input("stty size\n")
	tm.waitFor("40 120")
	tm.ws.CloseNow()

	// The shell outlives the socket: rejoin it by tag.
	again := dialPTY(t, c, key, id)
	again.send(map[string]any{"type": "connect", "tag": tm.tag})
	again.input("echo back-$((1+1))\n")
	again.waitFor("back-2")
	again.input("exit 5\n")
	again.waitFor("")
	if again.exit == nil || *again.exit != 5 {
		t.Fatalf("exit code: %v (output %q)", again.exit, again.output.String())
	}

	// Bad first messages get a fatal error, not a hang.
	for _, first := range []map[string]any{{"type": "dance"}, {"type": "connect"}, {"type": "start", "cols": 5000}} {
		bad := dialPTY(t, c, key, id)
		bad.send(first)
		_, raw, err := bad.ws.Read(t.Context())
		var ev ptyEvent
		if err != nil || json.Unmarshal(raw, &ev) != nil || ev.Type != "error" || !ev.Fatal {
			t.Fatalf("first message %v: %s %v", first, raw, err)
		}
		bad.ws.CloseNow()
	}
}
