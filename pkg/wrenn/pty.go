package wrenn

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"sync"

	"github.com/coder/websocket"
)

// TerminalParams start an interactive terminal; zero values take the
// server's defaults (/bin/bash, 80x24).
type TerminalParams struct {
	Cmd  string            `json:"cmd,omitempty"`
	Args []string          `json:"args,omitempty"`
	Cols int               `json:"cols,omitempty"`
	Rows int               `json:"rows,omitempty"`
	Envs map[string]string `json:"envs,omitempty"`
	Cwd  string            `json:"cwd,omitempty"`
	User string            `json:"user,omitempty"`
}

// Terminal is an interactive session in a capsule. The process outlives
// the connection: Close and JoinTerminal again with Tag.
type Terminal struct {
	ws   *websocket.Conn
	ctx  context.Context
	mu   sync.Mutex // serialises writes
	tag  string
	pid  int
	done bool
}

// TerminalEvent is one message from the terminal.
type TerminalEvent struct {
	Output   []byte // terminal bytes (Type "output")
	ExitCode int    // Type "exit"
	Type     string // output, exit, error, started
	Error    string
}

// OpenTerminal starts a process on a terminal in the capsule.
func (c *Client) OpenTerminal(ctx context.Context, id string, p TerminalParams) (*Terminal, error) {
	start := struct {
		Type string `json:"type"`
		TerminalParams
	}{"start", p}
	return c.terminal(ctx, id, start)
}

// JoinTerminal attaches to a running terminal session by its tag.
func (c *Client) JoinTerminal(ctx context.Context, id, tag string) (*Terminal, error) {
	return c.terminal(ctx, id, map[string]string{"type": "connect", "tag": tag})
}

func (c *Client) terminal(ctx context.Context, id string, first any) (*Terminal, error) {
	ws, err := c.dial(ctx, "/v1/capsules/"+url.PathEscape(id)+"/pty")
	if err != nil {
		return nil, err
	}
	t := &Terminal{ws: ws, ctx: ctx}
	if err := t.send(first); err != nil {
		ws.CloseNow()
		return nil, err
	}
	// The first answer says whether the session exists.
	ev, err := t.Next()
	if err != nil {
		ws.CloseNow()
		return nil, err
	}
	if ev.Type != "started" {
		ws.CloseNow()
		return nil, fmt.Errorf("wrenn: terminal did not start: %s", ev.Error)
	}
	return t, nil
}

// Tag names the session for JoinTerminal.
func (t *Terminal) Tag() string { return t.tag }

// PID is the terminal process's PID in the capsule (0 after a join).
func (t *Terminal) PID() int { return t.pid }

// Write sends keystrokes (raw bytes) to the terminal.
func (t *Terminal) Write(p []byte) (int, error) {
	if err := t.send(map[string]string{"type": "input", "data": base64.StdEncoding.EncodeToString(p)}); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Resize changes the terminal's size.
func (t *Terminal) Resize(cols, rows int) error {
	return t.send(map[string]any{"type": "resize", "cols": cols, "rows": rows})
}

// Kill ends the terminal's process.
func (t *Terminal) Kill() error { return t.send(map[string]string{"type": "kill"}) }

// Close drops the connection; the process keeps running.
func (t *Terminal) Close() error { return t.ws.Close(websocket.StatusNormalClosure, "") }

// Next waits for the next event; after "exit" (or a fatal error) it
// returns an error.
func (t *Terminal) Next() (TerminalEvent, error) {
	for {
		if t.done {
			return TerminalEvent{}, fmt.Errorf("wrenn: the terminal has ended")
		}
		_, raw, err := t.ws.Read(t.ctx)
		if err != nil {
			return TerminalEvent{}, fmt.Errorf("wrenn: terminal connection: %w", err)
		}
		var m struct {
			Type     string `json:"type"`
			Tag      string `json:"tag"`
			PID      int    `json:"pid"`
			Data     string `json:"data"`
			ExitCode *int   `json:"exit_code"`
			Fatal    bool   `json:"fatal"`
		}
		if err := json.Unmarshal(raw, &m); err != nil {
			return TerminalEvent{}, fmt.Errorf("wrenn: bad terminal message: %w", err)
		}
		switch m.Type {
		case "started":
			t.tag, t.pid = m.Tag, m.PID
			return TerminalEvent{Type: "started"}, nil
		case "output":
			b, err := base64.StdEncoding.DecodeString(m.Data)
			if err != nil {
				return TerminalEvent{}, fmt.Errorf("wrenn: bad terminal output: %w", err)
			}
			return TerminalEvent{Type: "output", Output: b}, nil
		case "exit":
			t.done = true
			code := -1
			if m.ExitCode != nil {
				code = *m.ExitCode
			}
			return TerminalEvent{Type: "exit", ExitCode: code}, nil
		case "error":
			if m.Fatal {
				t.done = true
			}
			return TerminalEvent{Type: "error", Error: m.Data}, nil
		}
		// "ping" and unknown types are skipped.
	}
}

func (t *Terminal) send(v any) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return writeJSONMessage(t.ctx, t.ws, v)
}
