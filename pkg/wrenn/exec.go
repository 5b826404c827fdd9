package wrenn

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/coder/websocket"
)

// ExecParams describe a command.
type ExecParams struct {
	Cmd        string            `json:"cmd"`
	Args       []string          `json:"args,omitempty"`
	Envs       map[string]string `json:"envs,omitempty"`
	Cwd        string            `json:"cwd,omitempty"`
	User       string            `json:"user,omitempty"`
	TimeoutSec int               `json:"timeout_sec,omitempty"` // Exec: default 30 s; ExecStream: none
	// Stdin feeds the command's standard input: Exec sends it whole (up
	// to 4 MiB), ExecStream streams it and closes stdin at EOF.
	Stdin io.Reader `json:"-"`
}

// ErrTimedOut is returned (wrapped) for a command that ran past its
// timeout: the server killed it and the processes it started.
var ErrTimedOut = errors.New("the command did not finish within its timeout and was killed")

// ExecResult is a finished command.
type ExecResult struct {
	Stdout     []byte
	Stderr     []byte
	ExitCode   int
	DurationMS int64
	Truncated  bool // output beyond the server's limit was dropped
}

// Exec runs a command to its end and returns its output.
func (c *Client) Exec(ctx context.Context, id string, p ExecParams) (ExecResult, error) {
	var out struct {
		Stdout     string `json:"stdout"`
		Stderr     string `json:"stderr"`
		Encoding   string `json:"encoding"`
		ExitCode   int    `json:"exit_code"`
		DurationMS int64  `json:"duration_ms"`
		Truncated  bool   `json:"truncated"`
	}
	body := struct {
		ExecParams
		Stdin         *string `json:"stdin,omitempty"`
		StdinEncoding string  `json:"stdin_encoding,omitempty"`
	}{ExecParams: p}
	if p.Stdin != nil {
		data, err := io.ReadAll(io.LimitReader(p.Stdin, maxExecStdin+1))
		if err != nil {
			return ExecResult{}, fmt.Errorf("wrenn: read stdin: %w", err)
		}
		if len(data) > maxExecStdin {
			return ExecResult{}, fmt.Errorf("wrenn: stdin is larger than %d MiB; use ExecStream", maxExecStdin>>20)
		}
		enc := base64.StdEncoding.EncodeToString(data)
		body.Stdin, body.StdinEncoding = &enc, "base64"
	}
	if err := c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/exec", body, &out); err != nil {
		var ae *APIError
		if errors.As(err, &ae) && ae.TimedOut {
			return ExecResult{ExitCode: -1}, fmt.Errorf("%w (%s)", ErrTimedOut, ae.Message)
		}
		return ExecResult{}, err
	}
	res := ExecResult{Stdout: []byte(out.Stdout), Stderr: []byte(out.Stderr), ExitCode: out.ExitCode, DurationMS: out.DurationMS, Truncated: out.Truncated}
	if out.Encoding == "base64" {
		var err error
		if res.Stdout, err = base64.StdEncoding.DecodeString(out.Stdout); err != nil {
			return res, fmt.Errorf("wrenn: decode stdout: %w", err)
		}
		if res.Stderr, err = base64.StdEncoding.DecodeString(out.Stderr); err != nil {
			return res, fmt.Errorf("wrenn: decode stderr: %w", err)
		}
	}
	return res, nil
}

// Process is a command left running in the background.
type Process struct {
	PID int    `json:"pid"`
	Tag string `json:"tag"`
	Cmd string `json:"cmd"`
}

// StartProcess starts a command in the background; tag names it for
// KillProcess and ConnectProcess (generated when empty).
func (c *Client) StartProcess(ctx context.Context, id string, p ExecParams, tag string) (Process, error) {
	body := struct {
		ExecParams
		Background bool   `json:"background"`
		Tag        string `json:"tag,omitempty"`
	}{p, true, tag}
	var out Process
	err := c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/exec", body, &out)
	return out, err
}

// ListProcesses lists the commands envd runs in a capsule.
func (c *Client) ListProcesses(ctx context.Context, id string) ([]Process, error) {
	var out struct {
		Processes []Process `json:"processes"`
	}
	err := c.do(ctx, http.MethodGet, "/v1/capsules/"+url.PathEscape(id)+"/processes", nil, &out)
	return out.Processes, err
}

// KillProcess ends a process named by PID or tag (SIGKILL).
func (c *Client) KillProcess(ctx context.Context, id, selector string) error {
	return c.do(ctx, http.MethodDelete, "/v1/capsules/"+url.PathEscape(id)+"/processes/"+url.PathEscape(selector), nil, nil)
}

// OutputFunc receives a command's output as it comes; stream is
// "stdout" or "stderr".
type OutputFunc func(stream string, data []byte)

// ExecStream runs a command and calls out with its output as it is
// produced; it returns the exit code. Cancelling ctx stops the command.
func (c *Client) ExecStream(ctx context.Context, id string, p ExecParams, out OutputFunc) (int, error) {
	ws, err := c.dial(ctx, "/v1/capsules/"+url.PathEscape(id)+"/exec/stream")
	if err != nil {
		return -1, err
	}
	defer ws.CloseNow()
	start := struct {
		Type string `json:"type"`
		ExecParams
		StdinOpen bool `json:"stdin_open,omitempty"`
	}{"start", p, p.Stdin != nil}
	if err := writeJSONMessage(ctx, ws, start); err != nil {
		return -1, err
	}
	stop := context.AfterFunc(ctx, func() {
		// Best effort: ask the server to kill the command before the socket goes.
		_ = writeJSONMessage(context.Background(), ws, map[string]string{"type": "stop"})
	})
	defer stop()
	var started func()
	if p.Stdin != nil {
		started = func() { go feedStdin(ctx, ws, p.Stdin) }
	}
	return followStarted(ctx, ws, out, started)
}

// maxExecStdin is the most stdin Exec sends (the server's limit).
const maxExecStdin = 4 << 20

// feedStdin streams r to the command's stdin in chunks, then closes it.
func feedStdin(ctx context.Context, ws *websocket.Conn, r io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			msg := map[string]string{"type": "stdin", "data": base64.StdEncoding.EncodeToString(buf[:n]), "encoding": "base64"}
			if werr := writeJSONMessage(ctx, ws, msg); werr != nil {
				return
			}
		}
		if err != nil {
			_ = writeJSONMessage(ctx, ws, map[string]string{"type": "close_stdin"})
			return
		}
	}
}

// ConnectProcess follows a background process's output until it exits.
func (c *Client) ConnectProcess(ctx context.Context, id, selector string, out OutputFunc) (int, error) {
	ws, err := c.dial(ctx, "/v1/capsules/"+url.PathEscape(id)+"/processes/"+url.PathEscape(selector)+"/stream")
	if err != nil {
		return -1, err
	}
	defer ws.CloseNow()
	return follow(ctx, ws, out)
}

// follow reads stream events until exit.
func follow(ctx context.Context, ws *websocket.Conn, out OutputFunc) (int, error) {
	return followStarted(ctx, ws, out, nil)
}

// followStarted is follow that calls started (if set) once the process runs.
func followStarted(ctx context.Context, ws *websocket.Conn, out OutputFunc, started func()) (int, error) {
	for {
		_, raw, err := ws.Read(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return -1, ctx.Err()
			}
			return -1, fmt.Errorf("wrenn: the output stream ended before the command did: %w", err)
		}
		var ev struct {
			Type     string `json:"type"`
			Data     string `json:"data"`
			Encoding string `json:"encoding"`
			ExitCode *int   `json:"exit_code"`
		}
		if err := json.Unmarshal(raw, &ev); err != nil {
			return -1, fmt.Errorf("wrenn: bad stream message: %w", err)
		}
		switch ev.Type {
		case "start":
			if started != nil {
				started()
				started = nil
			}
		case "timeout":
			return -1, fmt.Errorf("wrenn: %w", ErrTimedOut)
		case "stdout", "stderr":
			data := []byte(ev.Data)
			if ev.Encoding == "base64" {
				if data, err = base64.StdEncoding.DecodeString(ev.Data); err != nil {
					return -1, fmt.Errorf("wrenn: bad %s data: %w", ev.Type, err)
				}
			}
			if out != nil {
				out(ev.Type, data)
			}
		case "exit":
			if ev.ExitCode == nil {
				return -1, fmt.Errorf("wrenn: exit message without a code")
			}
			return *ev.ExitCode, nil
		case "error":
			return -1, fmt.Errorf("wrenn: %s", ev.Data)
		}
	}
}

// dial opens an authenticated WebSocket to path.
func (c *Client) dial(ctx context.Context, path string) (*websocket.Conn, error) {
	u := *c.base
	u.Scheme = strings.Replace(u.Scheme, "http", "ws", 1)
	h := http.Header{}
	c.authorize(h)
	ws, resp, err := websocket.Dial(ctx, u.String()+path, &websocket.DialOptions{HTTPHeader: h, HTTPClient: c.http})
	if err != nil {
		if resp != nil {
			if aerr := checkResponse(resp); aerr != nil {
				return nil, aerr
			}
		}
		return nil, fmt.Errorf("wrenn: open %s: %w", path, err)
	}
	ws.SetReadLimit(4 << 20)
	return ws, nil
}

func writeJSONMessage(ctx context.Context, ws *websocket.Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := ws.Write(ctx, websocket.MessageText, b); err != nil {
		return fmt.Errorf("wrenn: send: %w", err)
	}
	return nil
}
