package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// ptyMessage is every client message of a terminal session; Type says
// which fields matter.
type ptyMessage struct {
	Type string            `json:"type"` // start, connect, input, resize, kill
	Cmd  string            `json:"cmd"`
	Args []string          `json:"args"`
	Cols uint32            `json:"cols"`
	Rows uint32            `json:"rows"`
	Envs map[string]string `json:"envs"`
	Cwd  string            `json:"cwd"`
	User string            `json:"user"`
	Tag  string            `json:"tag"`
	Data string            `json:"data"` // base64 terminal input
}

// ptyEvent is every server message of a terminal session.
type ptyEvent struct {
	Type     string `json:"type"` // started, output, exit, error, ping
	Tag      string `json:"tag,omitempty"`
	PID      uint32 `json:"pid,omitempty"`
	Data     string `json:"data,omitempty"`
	ExitCode *int32 `json:"exit_code,omitempty"`
	Fatal    bool   `json:"fatal,omitempty"`
}

const maxPTYSide = 1000

func validPTYSize(cols, rows uint32) bool {
	return cols >= 1 && rows >= 1 && cols <= maxPTYSide && rows <= maxPTYSide
}

// pty runs an interactive terminal session over a WebSocket. The process
// lives in the capsule, not in the socket: a client that drops can come
// back with {"type":"connect","tag":...}.
func (s *Server) pty(w http.ResponseWriter, r *http.Request, p *principal) error {
	ss, err := s.openSession(w, r, p)
	if err != nil {
		return err
	}
	defer ss.close()
	sb, c, conn, ctx, cancel := ss.sb, ss.c, ss.conn, ss.ctx, ss.cancel
	send := func(ev ptyEvent) error { return wsWrite(ctx, conn, ev) }
	fail := func(msg string) {
		_ = send(ptyEvent{Type: "error", Data: msg, Fatal: true})
		conn.Close(websocket.StatusPolicyViolation, "terminal session refused")
	}

	raw, err := ss.first()
	if err != nil {
		return nil
	}
	var first ptyMessage
	if json.Unmarshal(raw, &first) != nil {
		fail("the first message must be JSON: {\"type\":\"start\"} or {\"type\":\"connect\",\"tag\":...}")
		return nil
	}
	var (
		stream *connect.ServerStreamForClient[pb.ExecStreamResponse]
		tag    string
	)
	switch first.Type {
	case "start":
		if first.Cmd == "" {
			first.Cmd = "/bin/bash"
		}
		if first.Cols == 0 {
			first.Cols = 80
		}
		if first.Rows == 0 {
			first.Rows = 24
		}
		if !validPTYSize(first.Cols, first.Rows) {
			fail("cols and rows must be between 1 and 1000")
			return nil
		}
		env := map[string]string{"TERM": "xterm-256color"}
		for k, v := range first.Envs {
			env[k] = v
		}
		tag = "pty-" + strings.ToLower(auth.RandomString(8))
		stream, err = c.ExecStream(ctx, connect.NewRequest(&pb.ExecRequest{
			SandboxId: sb.ID, Cmd: first.Cmd, Args: first.Args, Env: env, Cwd: first.Cwd, User: v1User(sb, first.User),
			Pty: &pb.PtySize{Cols: first.Cols, Rows: first.Rows}, Tag: tag,
		}))
	case "connect":
		if first.Tag == "" {
			fail("connect needs the tag of a running session")
			return nil
		}
		tag = first.Tag
		stream, err = c.ConnectProcess(ctx, connect.NewRequest(&pb.ConnectProcessRequest{Process: &pb.ProcessRef{SandboxId: sb.ID, Tag: tag}}))
	default:
		fail("the first message must be {\"type\":\"start\"} or {\"type\":\"connect\",\"tag\":...}")
		return nil
	}
	if err != nil {
		fail(errorMessage(err))
		return nil
	}
	defer stream.Close()
	ref := &pb.ProcessRef{SandboxId: sb.ID, Tag: tag}
	if first.Type == "connect" {
		// A reconnect has no start event from the agent; say hello here.
		if err := send(ptyEvent{Type: "started", Tag: tag}); err != nil {
			return nil
		}
	}

	go s.ptyInput(ctx, cancel, conn, c, ref, send)
	go func() {
		// Keep idle terminals from being cut by proxies between us and the client.
		t := time.NewTicker(25 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				_ = send(ptyEvent{Type: "ping"})
			}
		}
	}()

	for stream.Receive() {
		var ev ptyEvent
		switch e := stream.Msg().GetEvent().(type) {
		case *pb.ExecStreamResponse_Pid:
			ev = ptyEvent{Type: "started", Tag: tag, PID: e.Pid}
		case *pb.ExecStreamResponse_Pty:
			ev = ptyEvent{Type: "output", Data: base64.StdEncoding.EncodeToString(e.Pty)}
		case *pb.ExecStreamResponse_Stdout:
			ev = ptyEvent{Type: "output", Data: base64.StdEncoding.EncodeToString(e.Stdout)}
		case *pb.ExecStreamResponse_Stderr:
			ev = ptyEvent{Type: "output", Data: base64.StdEncoding.EncodeToString(e.Stderr)}
		case *pb.ExecStreamResponse_ExitCode:
			code := e.ExitCode
			ev = ptyEvent{Type: "exit", ExitCode: &code}
		default:
			continue
		}
		if err := send(ev); err != nil {
			return nil
		}
		if ev.Type == "exit" {
			conn.Close(websocket.StatusNormalClosure, "process exited")
			return nil
		}
	}
	if err := stream.Err(); err != nil && ctx.Err() == nil {
		_ = send(ptyEvent{Type: "error", Data: errorMessage(err), Fatal: true})
	}
	conn.Close(websocket.StatusNormalClosure, "session ended")
	return nil
}

// ptyInput relays client messages to the agent until the socket closes,
// then cancels the session's context (the process itself runs on).
func (s *Server) ptyInput(ctx context.Context, cancel context.CancelFunc, conn *websocket.Conn, c agentclient.Client, ref *pb.ProcessRef, send func(ptyEvent) error) {
	defer cancel()
	for {
		_, raw, err := conn.Read(ctx)
		if err != nil {
			return
		}
		var m ptyMessage
		if err := json.Unmarshal(raw, &m); err != nil {
			_ = send(ptyEvent{Type: "error", Data: "messages must be JSON"})
			continue
		}
		switch m.Type {
		case "input":
			data, err := base64.StdEncoding.DecodeString(m.Data)
			if err != nil {
				_ = send(ptyEvent{Type: "error", Data: "input data must be base64"})
				continue
			}
			_, err = c.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: ref, Data: data}))
			if err != nil && ctx.Err() == nil {
				_ = send(ptyEvent{Type: "error", Data: "input: " + errorMessage(err)})
			}
		case "resize":
			if !validPTYSize(m.Cols, m.Rows) {
				_ = send(ptyEvent{Type: "error", Data: "cols and rows must be between 1 and 1000"})
				continue
			}
			_, err := c.ResizePty(ctx, connect.NewRequest(&pb.ResizePtyRequest{Process: ref, Size: &pb.PtySize{Cols: m.Cols, Rows: m.Rows}}))
			if err != nil && ctx.Err() == nil {
				_ = send(ptyEvent{Type: "error", Data: "resize: " + errorMessage(err)})
			}
		case "kill":
			_, err := c.KillProcess(ctx, connect.NewRequest(&pb.KillProcessRequest{Process: ref, Force: true}))
			if err != nil && ctx.Err() == nil {
				_ = send(ptyEvent{Type: "error", Data: "kill: " + errorMessage(err)})
			}
		case "ping", "pong":
		default:
			_ = send(ptyEvent{Type: "error", Data: "unknown message type " + strconv.Quote(m.Type)})
		}
	}
}
