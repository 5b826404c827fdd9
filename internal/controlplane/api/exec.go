package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"

	"connectrpc.com/connect"
	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

type execRequest struct {
	Cmd        string            `json:"cmd"`
	Args       []string          `json:"args"`
	TimeoutSec *int              `json:"timeout_sec"`
	Background bool              `json:"background"`
	Tag        string            `json:"tag"`
	Envs       map[string]string `json:"envs"`
	Cwd        string            `json:"cwd"`
	User       string            `json:"user"`
	// Stdin is written to the command's stdin, then closed (exec); with
	// StdinEncoding "base64" it is decoded first.
	Stdin         *string `json:"stdin"`
	StdinEncoding string  `json:"stdin_encoding"`
	// KeepStdin (exec/stream) keeps stdin open for "stdin" messages.
	KeepStdin bool `json:"stdin_open"`
}

// maxExecStdin bounds the stdin of one exec call (the agent's limit).
const maxExecStdin = 4 << 20

// defaultExecTimeout is a foreground exec's timeout when none is given.
const defaultExecTimeout = 30

func (e *execRequest) validate() error {
	if e.Cmd == "" {
		return badRequest("cmd is required")
	}
	if len(e.Args) > 4096 {
		return badRequest("at most 4096 args")
	}
	if e.TimeoutSec != nil && (*e.TimeoutSec < 0 || *e.TimeoutSec > 24*3600) {
		return badRequest("timeout_sec must be between 0 and 86400")
	}
	if len(e.Tag) > 128 {
		return badRequest("tag must be at most 128 characters")
	}
	switch e.StdinEncoding {
	case "", "utf-8", "base64":
	default:
		return badRequest("stdin_encoding must be utf-8 or base64")
	}
	if e.Stdin != nil && len(*e.Stdin) > maxExecStdin*4/3+4 {
		return badRequest("stdin is larger than %d MiB; write a file and redirect it instead", maxExecStdin>>20)
	}
	return nil
}

// stdinBytes decodes Stdin.
func (e *execRequest) stdinBytes() ([]byte, error) {
	if e.Stdin == nil {
		return nil, nil
	}
	if e.StdinEncoding != "base64" {
		return []byte(*e.Stdin), nil
	}
	b, err := base64.StdEncoding.DecodeString(*e.Stdin)
	if err != nil {
		return nil, badRequest("stdin is not base64: %s", err.Error())
	}
	return b, nil
}

func (e *execRequest) agent(sb store.Sandbox) *pb.ExecRequest {
	in := &pb.ExecRequest{SandboxId: sb.ID, Cmd: e.Cmd, Args: e.Args, Env: e.Envs, Cwd: e.Cwd, User: v1User(sb, e.User), Tag: e.Tag, KeepStdin: e.KeepStdin}
	in.Stdin, _ = e.stdinBytes() // validated by the caller
	if e.TimeoutSec != nil {
		in.TimeoutSeconds = int32(*e.TimeoutSec)
	}
	return in
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req execRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if err := req.validate(); err != nil {
		return err
	}
	sb, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	if req.Background {
		if req.Tag == "" {
			req.Tag = "bg-" + auth.RandomString(8)
		}
		resp, err := c.StartProcess(r.Context(), connect.NewRequest(req.agent(sb)))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusAccepted, map[string]any{"sandbox_id": sb.ID, "cmd": req.Cmd, "pid": resp.Msg.GetPid(), "tag": req.Tag})
		return nil
	}
	if _, err := req.stdinBytes(); err != nil {
		return err
	}
	if req.TimeoutSec == nil || *req.TimeoutSec == 0 {
		t := defaultExecTimeout
		req.TimeoutSec = &t
	}
	// The answer waits for the command: its deadline follows the command's.
	if d := time.Duration(*req.TimeoutSec)*time.Second + time.Minute; d > s.cfg.Limits.Write {
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
	}
	start := time.Now()
	resp, err := c.Exec(r.Context(), connect.NewRequest(req.agent(sb)))
	if err != nil {
		return err
	}
	out := map[string]any{"sandbox_id": sb.ID, "cmd": req.Cmd, "exit_code": resp.Msg.GetExitCode(),
		"duration_ms": time.Since(start).Milliseconds(), "truncated": resp.Msg.GetTruncated()}
	stdout, stderr := resp.Msg.GetStdout(), resp.Msg.GetStderr()
	if utf8.Valid(stdout) && utf8.Valid(stderr) {
		out["stdout"], out["stderr"], out["encoding"] = string(stdout), string(stderr), "utf-8"
	} else {
		out["stdout"], out["stderr"], out["encoding"] = base64.StdEncoding.EncodeToString(stdout), base64.StdEncoding.EncodeToString(stderr), "base64"
	}
	if resp.Msg.GetTimedOut() {
		// As upstream Wrenn answers it (502 agent_error, which its SDK
		// maps), saying so, with timed_out and what it wrote until then.
		out["timed_out"], out["exit_code"] = true, -1
		e := errf(http.StatusBadGateway, "agent_error", "timed out: the command did not finish within its timeout of %d s and was killed (with the processes it started); give a longer timeout_sec, or run it in the background", *req.TimeoutSec)
		e.extra = out
		return e
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) listProcesses(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	resp, err := c.ListProcesses(r.Context(), connect.NewRequest(&pb.ListProcessesRequest{SandboxId: sb.ID}))
	if err != nil {
		return err
	}
	procs := make([]map[string]any, 0, len(resp.Msg.GetProcesses()))
	for _, pr := range resp.Msg.GetProcesses() {
		procs = append(procs, map[string]any{"pid": pr.GetPid(), "tag": pr.GetTag(), "cmd": pr.GetCmd(), "args": pr.GetArgs(), "cwd": pr.GetCwd()})
	}
	writeJSON(w, http.StatusOK, map[string]any{"processes": procs})
	return nil
}

// processRef reads a selector: a numeric PID or a tag.
func processRef(sandboxID, selector string) *pb.ProcessRef {
	if pid, err := strconv.ParseUint(selector, 10, 32); err == nil {
		return &pb.ProcessRef{SandboxId: sandboxID, Pid: uint32(pid)}
	}
	return &pb.ProcessRef{SandboxId: sandboxID, Tag: selector}
}

func (s *Server) killProcess(w http.ResponseWriter, r *http.Request, p *principal) error {
	force := true
	switch r.URL.Query().Get("signal") {
	case "", "SIGKILL":
	case "SIGTERM":
		force = false
	default:
		return badRequest("signal must be SIGKILL or SIGTERM")
	}
	sb, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	_, err = c.KillProcess(r.Context(), connect.NewRequest(&pb.KillProcessRequest{Process: processRef(sb.ID, r.PathValue("selector")), Force: force}))
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// streamEvent is one WebSocket message of exec and process streams.
type streamEvent struct {
	Type     string `json:"type"`
	PID      uint32 `json:"pid,omitempty"`
	Data     string `json:"data,omitempty"`
	Encoding string `json:"encoding,omitempty"`
	ExitCode *int32 `json:"exit_code,omitempty"`
}

func outputEvent(typ string, b []byte) streamEvent {
	if utf8.Valid(b) {
		return streamEvent{Type: typ, Data: string(b)}
	}
	return streamEvent{Type: typ, Data: base64.StdEncoding.EncodeToString(b), Encoding: "base64"}
}

// wsWrite sends one JSON message, giving a stalled client 30 s.
func wsWrite(ctx context.Context, conn *websocket.Conn, msg any) error {
	b, _ := json.Marshal(msg)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return conn.Write(wctx, websocket.MessageText, b)
}

// pump relays an agent stream of process events to the WebSocket;
// started (if set) is closed once the process runs.
func pump(ctx context.Context, conn *websocket.Conn, stream *connect.ServerStreamForClient[pb.ExecStreamResponse], started chan struct{}) {
	for stream.Receive() {
		m := stream.Msg()
		var ev streamEvent
		switch e := m.GetEvent().(type) {
		case *pb.ExecStreamResponse_Pid:
			ev = streamEvent{Type: "start", PID: e.Pid}
			if started != nil {
				close(started)
				started = nil
			}
		case *pb.ExecStreamResponse_Stdout:
			ev = outputEvent("stdout", e.Stdout)
		case *pb.ExecStreamResponse_Stderr:
			ev = outputEvent("stderr", e.Stderr)
		case *pb.ExecStreamResponse_Pty:
			ev = outputEvent("stdout", e.Pty)
		case *pb.ExecStreamResponse_ExitCode:
			code := e.ExitCode
			ev = streamEvent{Type: "exit", ExitCode: &code}
		case *pb.ExecStreamResponse_TimedOut:
			ev = streamEvent{Type: "timeout", Data: "the command did not finish within its timeout and was killed (with the processes it started)"}
		default:
			continue
		}
		if err := wsWrite(ctx, conn, ev); err != nil {
			return
		}
		if ev.Type == "exit" || ev.Type == "timeout" {
			conn.Close(websocket.StatusNormalClosure, "process "+ev.Type)
			return
		}
	}
	if err := stream.Err(); err != nil && ctx.Err() == nil {
		_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: connect.CodeOf(err).String() + ": " + errorMessage(err)})
	}
	conn.Close(websocket.StatusNormalClosure, "stream ended")
}

func errorMessage(err error) string {
	return agentclient.Message(err)
}

// accept upgrades to a WebSocket; non-browser clients send no Origin and
// browsers must be on the API's own origin.
func accept(w http.ResponseWriter, r *http.Request) (*websocket.Conn, error) {
	if conn, ok := r.Context().Value(acceptedConn{}).(*websocket.Conn); ok {
		return conn, nil // accepted to read its credentials from the first message
	}
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		return nil, errf(http.StatusBadRequest, "websocket_required", "this endpoint needs a WebSocket upgrade")
	}
	conn.SetReadLimit(1 << 20)
	return conn, nil
}

// session is an accepted WebSocket on a running capsule; its context
// ends with the request or when cancelled.
type session struct {
	sb     store.Sandbox
	c      agentclient.Client
	conn   *websocket.Conn
	ctx    context.Context
	cancel context.CancelFunc
}

// openSession checks the capsule runs, then upgrades the request.
func (s *Server) openSession(w http.ResponseWriter, r *http.Request, p *principal) (*session, error) {
	sb, c, err := s.running(r, p)
	if err != nil {
		return nil, err
	}
	conn, err := accept(w, r)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(r.Context())
	return &session{sb: sb, c: c, conn: conn, ctx: ctx, cancel: cancel}, nil
}

func (ss *session) close() {
	ss.cancel()
	ss.conn.CloseNow()
}

// first reads the client's opening message, which must come within 30 s.
func (ss *session) first() ([]byte, error) {
	rctx, rcancel := context.WithTimeout(ss.ctx, 30*time.Second)
	defer rcancel()
	_, msg, err := ss.conn.Read(rctx)
	return msg, err
}

func (s *Server) execStream(w http.ResponseWriter, r *http.Request, p *principal) error {
	ss, err := s.openSession(w, r, p)
	if err != nil {
		return err
	}
	defer ss.close()
	sb, c, conn, ctx, cancel := ss.sb, ss.c, ss.conn, ss.ctx, ss.cancel
	var start struct {
		Type string `json:"type"`
		execRequest
	}
	msg, err := ss.first()
	if err != nil {
		return nil
	}
	if json.Unmarshal(msg, &start) != nil || start.Type != "start" {
		_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: `the first message must be {"type":"start","cmd":...}`})
		conn.Close(websocket.StatusPolicyViolation, "expected a start message")
		return nil
	}
	if err := start.validate(); err != nil {
		_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: err.Error()})
		conn.Close(websocket.StatusPolicyViolation, "invalid start message")
		return nil
	}
	tag := "ws-" + auth.RandomString(10)
	start.Tag = tag
	stream, err := c.ExecStream(ctx, connect.NewRequest(start.agent(sb)))
	if err != nil {
		_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: errorMessage(err)})
		return nil
	}
	defer stream.Close()
	// Client messages: {"type":"stdin","data":...[,"encoding":"base64"]}
	// feeds stdin (started with "stdin_open": true), {"type":"close_stdin"}
	// ends it, {"type":"stop"} kills the process; a closed socket ends the
	// stream, and the agent kills the command with it.
	ref := &pb.ProcessRef{SandboxId: sb.ID, Tag: tag}
	started := make(chan struct{})
	go func() {
		for {
			_, msg, err := conn.Read(ctx)
			if err != nil {
				cancel()
				return
			}
			var m struct {
				Type     string `json:"type"`
				Data     string `json:"data"`
				Encoding string `json:"encoding"`
			}
			if json.Unmarshal(msg, &m) != nil {
				continue
			}
			switch m.Type {
			case "stop":
				_, _ = c.KillProcess(ctx, connect.NewRequest(&pb.KillProcessRequest{Process: ref, Force: true}))
			case "stdin", "close_stdin":
				select { // input waits for the process to exist
				case <-started:
				case <-ctx.Done():
					return
				}
				data := []byte(m.Data)
				if m.Encoding == "base64" {
					if data, err = base64.StdEncoding.DecodeString(m.Data); err != nil {
						_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: "stdin data is not base64"})
						continue
					}
				}
				if _, err := c.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: ref, Data: data, CloseStdin: m.Type == "close_stdin"})); err != nil && ctx.Err() == nil {
					_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: "stdin: " + errorMessage(err)})
				}
			}
		}
	}()
	pump(ctx, conn, stream, started)
	return nil
}

func (s *Server) processStream(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stream, err := c.ConnectProcess(ctx, connect.NewRequest(&pb.ConnectProcessRequest{Process: processRef(sb.ID, r.PathValue("selector"))}))
	if err != nil {
		return err
	}
	defer stream.Close()
	conn, err := accept(w, r)
	if err != nil {
		return err
	}
	defer conn.CloseNow()
	go func() {
		// Reading notices the client going away; messages are ignored.
		for {
			if _, _, err := conn.Read(ctx); err != nil {
				cancel()
				return
			}
		}
	}()
	pump(ctx, conn, stream, nil)
	return nil
}

// v1User is who a /v1 command or file call acts as: the capsule's default
// user (its template's, from a build) or else root, unless the caller
// names someone (upstream Wrenn's default; the E2B API keeps E2B's, user,
// since its SDKs talk to envd themselves).
func v1User(sb store.Sandbox, u string) string {
	switch {
	case u != "":
		return u
	case sb.DefaultUser != "":
		return sb.DefaultUser
	}
	return "root"
}
