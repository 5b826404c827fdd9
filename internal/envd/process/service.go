// Package process implements envd's process.Process Connect service:
// starting commands as a user, streaming their output, feeding their input,
// signalling them and re-attaching to them after a client disconnects.
package process

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/envd/identity"
	"github.com/wrenn/wrenn/internal/envd/session"
	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

// Limits on what a client may ask for.
const (
	maxPTYSide  = 4096
	maxTagLen   = 256
	maxInputLen = 4 << 20
)

// Service is the process.Process handler.
type Service struct {
	log      *slog.Logger
	defaults *session.Defaults

	mu    sync.Mutex
	byPID map[uint32]*proc
	byTag map[string]*proc
}

var _ processconnect.ProcessHandler = (*Service)(nil)

// NewService returns an empty process table.
func NewService(log *slog.Logger, defaults *session.Defaults) *Service {
	return &Service{log: log, defaults: defaults, byPID: map[uint32]*proc{}, byTag: map[string]*proc{}}
}

// Shutdown kills every process envd started; used when envd itself stops.
func (s *Service) Shutdown() {
	s.mu.Lock()
	procs := make([]*proc, 0, len(s.byPID))
	for _, p := range s.byPID {
		procs = append(procs, p)
	}
	s.mu.Unlock()
	for _, p := range procs {
		_ = p.signal(syscall.SIGKILL)
		<-p.done
	}
}

type startConfig struct {
	path, argv0 string
	args        []string
	env         []string
	dir         string
	credential  *syscall.Credential
	tag         string
	config      *pb.ProcessConfig
	stdin       bool
	pty         *ptySize
	first       *subscriber
}

type ptySize struct{ cols, rows uint32 }

// Start launches a process and streams its events until it ends or the
// client leaves; the process keeps running after the client leaves.
func (s *Service) Start(ctx context.Context, req *connect.Request[pb.StartRequest], stream *connect.ServerStream[pb.StartResponse]) error {
	msg := req.Msg
	cfg, err := s.prepare(ctx, msg)
	if err != nil {
		return err
	}
	sub := newSubscriber()
	cfg.first = sub

	// Reserve the tag before starting, so two Starts with one tag cannot both run.
	s.mu.Lock()
	if cfg.tag != "" {
		if _, taken := s.byTag[cfg.tag]; taken {
			s.mu.Unlock()
			return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("a running process already has tag %q", cfg.tag))
		}
		s.byTag[cfg.tag] = nil
	}
	s.mu.Unlock()

	p, err := start(cfg)
	if err != nil {
		s.mu.Lock()
		if cfg.tag != "" {
			delete(s.byTag, cfg.tag)
		}
		s.mu.Unlock()
		return startError(cfg, err)
	}
	s.mu.Lock()
	s.byPID[p.pid] = p
	if p.tag != "" {
		s.byTag[p.tag] = p
	}
	s.mu.Unlock()
	s.log.Info("process started", "pid", p.pid, "cmd", msg.GetProcess().GetCmd(), "tag", p.tag, "pty", cfg.pty != nil)
	go p.supervise(func() { s.forget(p) })

	startEvt := &pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}
	if err := stream.Send(&pb.StartResponse{Event: startEvt}); err != nil {
		close(sub.gone)
		p.unsubscribe(sub)
		return err
	}
	return s.follow(ctx, req.Header(), p, sub, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.StartResponse{Event: ev})
	})
}

// Connect re-attaches to a running process and streams its events.
func (s *Service) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], stream *connect.ServerStream[pb.ConnectResponse]) error {
	p, err := s.lookup(req.Msg.GetProcess())
	if err != nil {
		return err
	}
	sub := newSubscriber()
	if !p.subscribe(sub) {
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("process %d has already ended", p.pid))
	}
	startEvt := &pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}
	if err := stream.Send(&pb.ConnectResponse{Event: startEvt}); err != nil {
		close(sub.gone)
		p.unsubscribe(sub)
		return err
	}
	return s.follow(ctx, req.Header(), p, sub, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.ConnectResponse{Event: ev})
	})
}

// follow relays a subscriber's events to the client until the end event,
// sending keepalives while the process is quiet.
func (s *Service) follow(ctx context.Context, h interface{ Get(string) string }, p *proc, sub *subscriber, send func(*pb.ProcessEvent) error) error {
	defer func() {
		close(sub.gone)
		p.unsubscribe(sub)
	}()
	keepalive := time.NewTicker(session.KeepaliveInterval(h))
	defer keepalive.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev := <-sub.events:
			if err := send(ev); err != nil {
				return err
			}
			if ev.GetEnd() != nil {
				return nil
			}
			keepalive.Reset(session.KeepaliveInterval(h))
		case <-keepalive.C:
			if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
		}
	}
}

// prepare validates a StartRequest and resolves everything start needs.
func (s *Service) prepare(ctx context.Context, msg *pb.StartRequest) (startConfig, error) {
	pc := msg.GetProcess()
	if pc == nil || strings.TrimSpace(pc.GetCmd()) == "" {
		return startConfig{}, connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd is required"))
	}
	if strings.ContainsRune(pc.GetCmd(), 0) {
		return startConfig{}, connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd contains a NUL byte"))
	}
	for _, a := range pc.GetArgs() {
		if strings.ContainsRune(a, 0) {
			return startConfig{}, connect.NewError(connect.CodeInvalidArgument, errors.New("process.args contain a NUL byte"))
		}
	}
	for k, v := range pc.GetEnvs() {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return startConfig{}, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("invalid environment variable name %q", k))
		}
	}
	tag := msg.GetTag()
	if len(tag) > maxTagLen {
		return startConfig{}, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("tag is longer than %d bytes", maxTagLen))
	}

	u := session.UserFrom(ctx)
	cred, err := identity.Credential(u)
	if err != nil {
		return startConfig{}, connect.NewError(connect.CodePermissionDenied, err)
	}

	dir := s.defaults.Workdir()
	if pc.Cwd != nil {
		dir = pc.GetCwd()
	}
	if dir == "" {
		dir = u.Home
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			dir = "/" // accounts like nobody have no home directory
		}
	}
	if dir, err = identity.ResolvePath(u, dir); err != nil {
		return startConfig{}, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("working directory: %w", err))
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return startConfig{}, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("working directory %s does not exist or is not a directory", dir))
	}

	env := buildEnv(s.defaults.Env(), u, pc.GetEnvs())
	path, argv0, args := "", pc.GetCmd(), pc.GetArgs()
	path, err = lookPath(pc.GetCmd(), env, dir)
	if err != nil {
		// As a shell would: the command runs, says why on stderr and exits
		// 127 (not found) or 126 (not executable), so every client sees an
		// ordinary process with an exit code, as from E2B's envd.
		code := 127
		var cr *cannotRun
		if errors.As(err, &cr) {
			code = cr.code
		}
		path, argv0 = "/bin/sh", "sh"
		args = []string{"-c", `printf '%s\n' "$1" >&2; exit ` + strconv.Itoa(code), "sh", err.Error()}
	}

	cfg := startConfig{
		path: path, argv0: argv0, args: args, env: env, dir: dir,
		credential: cred, tag: tag, config: pc, stdin: msg.Stdin == nil || msg.GetStdin(),
	}
	if msg.Pty != nil {
		size := msg.GetPty().GetSize()
		cols, rows := size.GetCols(), size.GetRows()
		if cols == 0 || rows == 0 {
			cols, rows = 80, 24
		}
		if cols > maxPTYSide || rows > maxPTYSide {
			return startConfig{}, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("pty size %dx%d is larger than %d", cols, rows, maxPTYSide))
		}
		cfg.pty = &ptySize{cols: cols, rows: rows}
	}
	return cfg, nil
}

// buildEnv layers the environment: a login-like base for the user, then
// the variables set by /init, then the request's own.
func buildEnv(initEnv map[string]string, u *identity.User, reqEnv map[string]string) []string {
	vars := map[string]string{
		"HOME":    u.Home,
		"USER":    u.Name,
		"LOGNAME": u.Name,
		"SHELL":   u.Shell,
		"PATH":    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG":    "C.UTF-8",
		"TERM":    "xterm-256color",
	}
	for k, v := range initEnv {
		vars[k] = v
	}
	for k, v := range reqEnv {
		vars[k] = v
	}
	out := make([]string, 0, len(vars))
	for k, v := range vars {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// lookPath finds cmd on the PATH of the process's own environment, not
// envd's, so a PATH set by the client is honoured.
func lookPath(cmd string, env []string, dir string) (string, error) {
	if strings.Contains(cmd, "/") {
		if !filepath.IsAbs(cmd) {
			cmd = filepath.Join(dir, cmd)
		}
		fi, err := os.Stat(cmd)
		switch {
		case err != nil:
			return "", &cannotRun{cmd + ": no such file or directory", 127}
		case fi.IsDir():
			return "", &cannotRun{cmd + ": is a directory", 126}
		case fi.Mode()&0o111 == 0:
			return "", &cannotRun{cmd + ": permission denied (not executable)", 126}
		}
		return cmd, nil
	}
	pathVar := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathVar = v
		}
	}
	for _, d := range filepath.SplitList(pathVar) {
		candidate := filepath.Join(d, cmd)
		if fi, err := os.Stat(candidate); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return candidate, nil
		}
	}
	return "", &cannotRun{cmd + ": command not found", 127}
}

// cannotRun says why a command cannot be started, with the exit code a
// shell gives for it: 127 not found, 126 not executable.
type cannotRun struct {
	msg  string
	code int
}

func (e *cannotRun) Error() string { return e.msg }

func startError(cfg startConfig, err error) error {
	switch {
	case errors.Is(err, os.ErrPermission):
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("start %s: %w", cfg.argv0, err))
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, os.ErrNotExist):
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("start %s: %w", cfg.argv0, err))
	default:
		return connect.NewError(connect.CodeInternal, fmt.Errorf("start %s: %w", cfg.argv0, err))
	}
}

func (s *Service) forget(p *proc) {
	s.mu.Lock()
	if s.byPID[p.pid] == p {
		delete(s.byPID, p.pid)
	}
	if p.tag != "" && s.byTag[p.tag] == p {
		delete(s.byTag, p.tag)
	}
	s.mu.Unlock()
	s.log.Info("process ended", "pid", p.pid, "tag", p.tag, "exit_code", p.endEvt.GetExitCode(), "status", p.endEvt.GetStatus())
}

func (s *Service) lookup(sel *pb.ProcessSelector) (*proc, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch v := sel.GetSelector().(type) {
	case *pb.ProcessSelector_Pid:
		if p, ok := s.byPID[v.Pid]; ok {
			return p, nil
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no running process with pid %d", v.Pid))
	case *pb.ProcessSelector_Tag:
		if p := s.byTag[v.Tag]; p != nil {
			return p, nil
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no running process with tag %q", v.Tag))
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector needs a pid or a tag"))
	}
}

// List returns the running processes, ordered by pid.
func (s *Service) List(_ context.Context, _ *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	s.mu.Lock()
	out := make([]*pb.ProcessInfo, 0, len(s.byPID))
	for _, p := range s.byPID {
		info := &pb.ProcessInfo{Config: p.config, Pid: p.pid}
		if p.tag != "" {
			tag := p.tag
			info.Tag = &tag
		}
		out = append(out, info)
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Pid < out[j].Pid })
	return connect.NewResponse(&pb.ListResponse{Processes: out}), nil
}

// Update resizes a process's PTY.
func (s *Service) Update(_ context.Context, req *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	p, err := s.lookup(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if req.Msg.Pty == nil {
		return connect.NewResponse(&pb.UpdateResponse{}), nil
	}
	if p.ptyFile == nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no PTY to resize", p.pid))
	}
	size := req.Msg.GetPty().GetSize()
	if size.GetCols() == 0 || size.GetRows() == 0 || size.GetCols() > maxPTYSide || size.GetRows() > maxPTYSide {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("pty size %dx%d must be between 1 and %d", size.GetCols(), size.GetRows(), maxPTYSide))
	}
	if err := setPTYSize(p.ptyFile, size.GetCols(), size.GetRows()); err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("resize pty of process %d: %w", p.pid, err))
	}
	return connect.NewResponse(&pb.UpdateResponse{}), nil
}

// SendInput writes one piece of input to a process.
func (s *Service) SendInput(_ context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	p, err := s.lookup(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.write(req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

// StreamInput takes a start event naming the process, then data events,
// and writes them in order.
func (s *Service) StreamInput(_ context.Context, stream *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	var p *proc
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *pb.StreamInputRequest_Start:
			found, err := s.lookup(ev.Start.GetProcess())
			if err != nil {
				return nil, err
			}
			p = found
		case *pb.StreamInputRequest_Data:
			if p == nil {
				return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("the first message must be a start event naming the process"))
			}
			if err := p.write(ev.Data.GetInput()); err != nil {
				return nil, err
			}
		case *pb.StreamInputRequest_Keepalive:
		default:
			return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("empty input event"))
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

// CloseStdin signals EOF to a process reading stdin.
func (s *Service) CloseStdin(_ context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	p, err := s.lookup(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if p.ptyFile != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d uses a PTY; send Ctrl-D (0x04) as input instead", p.pid))
	}
	p.inputMu.Lock()
	defer p.inputMu.Unlock()
	if p.stdin == nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d was started without stdin", p.pid))
	}
	if err := p.stdin.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("close stdin of process %d: %w", p.pid, err))
	}
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

// SendSignal delivers SIGTERM or SIGKILL to a process and its group.
func (s *Service) SendSignal(_ context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	var sig syscall.Signal
	switch req.Msg.GetSignal() {
	case pb.Signal_SIGNAL_SIGTERM:
		sig = syscall.SIGTERM
	case pb.Signal_SIGNAL_SIGKILL:
		sig = syscall.SIGKILL
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("unsupported signal %v: use SIGNAL_SIGTERM or SIGNAL_SIGKILL", req.Msg.GetSignal()))
	}
	p, err := s.lookup(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.signal(sig); err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("signal process %d: %w", p.pid, err))
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

// write sends input to stdin or the PTY, whichever the process has.
func (p *proc) write(in *pb.ProcessInput) error {
	var data []byte
	switch v := in.GetInput().(type) {
	case *pb.ProcessInput_Stdin:
		data = v.Stdin
	case *pb.ProcessInput_Pty:
		data = v.Pty
	default:
		return connect.NewError(connect.CodeInvalidArgument, errors.New("input needs stdin or pty bytes"))
	}
	if len(data) > maxInputLen {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("input of %d bytes is larger than %d", len(data), maxInputLen))
	}
	p.inputMu.Lock()
	defer p.inputMu.Unlock()
	var w interface{ Write([]byte) (int, error) }
	switch {
	case p.ptyFile != nil:
		w = p.ptyFile
	case p.stdin != nil:
		w = p.stdin
	default:
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d was started without stdin", p.pid))
	}
	if _, err := w.Write(data); err != nil {
		if errors.Is(err, os.ErrClosed) || errors.Is(err, syscall.EPIPE) {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("stdin of process %d is closed", p.pid))
		}
		return connect.NewError(connect.CodeInternal, fmt.Errorf("write input to process %d: %w", p.pid, err))
	}
	return nil
}
