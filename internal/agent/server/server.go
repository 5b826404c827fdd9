// Package server is the host agent's Connect RPC surface. Every call must
// carry the host token as "Authorization: Bearer <token>".
package server

import (
	"bytes"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/metrics"
	"github.com/wrenn/wrenn/internal/agent/proxy"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/guest/template"
	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/internal/safetext"
	fspb "github.com/wrenn/wrenn/proto/envd/filesystem"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// Limits on what passes through the agent in one message. Large files
// travel through the streaming RPCs in chunks instead.
const (
	maxFileBytes    = 4 << 20 // unary ReadFile and WriteFile, exec stdin
	maxExecOutput   = 1 << 20 // each of stdout and stderr of a unary Exec (ExecStream has no limit)
	maxRPCMessage   = maxFileBytes + 1<<20
	defaultExecTime = 60 * time.Second
	maxErrorText    = 1024 // an error message passed on from envd
	maxPorts        = 256  // ports listed for one sandbox
)

// Config wires the server.
type Config struct {
	Manager *sandbox.Manager
	Token   string
	// Tokens, when set, replaces Token: the current and the previous host
	// token (a registered host's JWT rotates; the old one works until the next rotation).
	Tokens   func() (current, previous string)
	Log      *slog.Logger
	WrennDir string
	VMM      string // driver name
	Accel    string
	Version  string
}

// Server implements the HostAgentService.
type Server struct {
	cfg     Config
	m       *sandbox.Manager
	log     *slog.Logger
	samples *metrics.Sampler
}

var _ hostagentv2connect.HostAgentServiceHandler = (*Server)(nil)

// Handler returns the authenticated HTTP handler: the RPCs, and the proxy
// into sandbox ports for requests that ask for it (see package proxy).
// It stops sweeping the proxy's connection pools when ctx ends.
func Handler(ctx context.Context, cfg Config) http.Handler {
	s := &Server{cfg: cfg, m: cfg.Manager, log: cfg.Log}
	s.samples = &metrics.Sampler{Targets: s.running}
	go s.samples.Run(ctx)
	path, h := hostagentv2connect.NewHostAgentServiceHandler(s,
		connect.WithReadMaxBytes(maxRPCMessage),
		connect.WithSendMaxBytes(maxRPCMessage),
		connect.WithRecover(func(_ context.Context, spec connect.Spec, _ http.Header, p any) error {
			cfg.Log.Error("panic in RPC handler", "procedure", spec.Procedure, "panic", p)
			return connect.NewError(connect.CodeInternal, errors.New("internal error"))
		}),
	)
	mux := http.NewServeMux()
	mux.Handle(path, h)
	tokens := cfg.Tokens
	if tokens == nil {
		tokens = func() (string, string) { return cfg.Token, "" }
	}
	rpc := authenticate(tokens, cfg.Log, mux)
	px := proxy.New(cfg.Manager, tokens, cfg.Log)
	go px.RunSweeper(ctx, 5*time.Second) // tunnels of a paused or destroyed sandbox close soon
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if proxy.IsProxyRequest(r) {
			px.ServeHTTP(w, r)
			return
		}
		rpc.ServeHTTP(w, r)
	})
}

// authenticate compares the bearer token in constant time.
func authenticate(tokens func() (string, string), log *slog.Logger, next http.Handler) http.Handler {
	matches := func(got []byte, token string) bool {
		return token != "" && subtle.ConstantTimeCompare(got, []byte("Bearer "+token)) == 1
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		current, previous := tokens()
		if !matches(got, current) && !matches(got, previous) {
			log.Warn("unauthenticated agent call", "procedure", r.URL.Path, "remote", r.RemoteAddr)
			_ = connect.NewErrorWriter().Write(w, r, connect.NewError(connect.CodeUnauthenticated, errors.New("missing or invalid host token")))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// toConnect maps manager and envd errors to the codes clients act on.
func toConnect(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		// envd's words reach tenants and logs: bounded and printable.
		msg := safetext.Clip(ce.Message(), maxErrorText)
		if !connect.IsWireError(ce) {
			// The agent's side of a call to envd failed on what envd sent.
			switch ce.Code() {
			case connect.CodeResourceExhausted:
				return connect.NewError(connect.CodeOutOfRange, errors.New("an answer from envd in the capsule is larger than the host agent accepts"))
			case connect.CodeInternal, connect.CodeUnknown:
				return connect.NewError(connect.CodeDataLoss, fmt.Errorf("envd in the capsule answered in a way the host agent does not accept (%s); a program in the capsule may have stopped or replaced it", msg))
			case connect.CodeUnavailable:
				return connect.NewError(connect.CodeUnavailable, fmt.Errorf("envd in the capsule does not answer (%s)", msg))
			}
		}
		return connect.NewError(ce.Code(), errors.New(msg))
	}
	var fe *envdclient.FileError
	switch {
	case errors.As(err, &fe):
		return connect.NewError(httpCode(fe.Status), errors.New(fe.Message))
	case errors.Is(err, sandbox.ErrNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, sandbox.ErrInvalid), errors.Is(err, sandbox.ErrTemplateUnkwn):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, sandbox.ErrExists):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, sandbox.ErrWrongState):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, sandbox.ErrNoCapacity), errors.Is(err, sandbox.ErrNoSpace):
		return connect.NewError(connect.CodeResourceExhausted, err)
	case errors.Is(err, sandbox.ErrBusy):
		return connect.NewError(connect.CodeUnavailable, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	default:
		return connect.NewError(connect.CodeInternal, err)
	}
}

func httpCode(status int) connect.Code {
	switch status {
	case http.StatusBadRequest:
		return connect.CodeInvalidArgument
	case http.StatusUnauthorized:
		return connect.CodeUnauthenticated
	case http.StatusForbidden:
		return connect.CodePermissionDenied
	case http.StatusNotFound:
		return connect.CodeNotFound
	case http.StatusRequestEntityTooLarge, http.StatusInsufficientStorage:
		return connect.CodeResourceExhausted
	default:
		return connect.CodeInternal
	}
}

func toProto(r sandbox.Record) *pb.Sandbox {
	states := map[sandbox.State]pb.SandboxState{
		sandbox.Pending: pb.SandboxState_SANDBOX_STATE_PENDING, sandbox.Starting: pb.SandboxState_SANDBOX_STATE_STARTING,
		sandbox.Running: pb.SandboxState_SANDBOX_STATE_RUNNING, sandbox.Paused: pb.SandboxState_SANDBOX_STATE_PAUSED,
		sandbox.Stopped: pb.SandboxState_SANDBOX_STATE_STOPPED, sandbox.Error: pb.SandboxState_SANDBOX_STATE_ERROR,
		sandbox.Pausing: pb.SandboxState_SANDBOX_STATE_PAUSING, sandbox.Resuming: pb.SandboxState_SANDBOX_STATE_RESUMING,
	}
	eg := &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_ALL}
	switch r.Egress.Mode {
	case egress.DenyAll:
		eg.Mode = pb.EgressPolicy_MODE_DENY_ALL
	case egress.AllowList:
		eg.Mode = pb.EgressPolicy_MODE_ALLOW_LIST
	}
	for _, p := range r.Egress.Allow {
		eg.AllowCidrs = append(eg.AllowCidrs, p.String())
	}
	for _, p := range r.Egress.Deny {
		eg.DenyCidrs = append(eg.DenyCidrs, p.String())
	}
	return &pb.Sandbox{
		Id: r.ID, Template: r.Template, State: states[r.State], Vcpus: int32(r.VCPUs), MemoryMib: int32(r.MemoryMiB),
		CreatedAt: timestamppb.New(r.CreatedAt), ExpiresAt: timestamppb.New(r.ExpiresAt), AutoPause: r.AutoPause,
		Metadata: r.Metadata, Address: r.Net.SandboxIP.String(), Egress: eg, DiskSizeMib: int32(r.DiskMiB),
		Error: r.Error, StartedFrom: r.StartedFrom, BootNote: r.BootNote,
	}
}

func egressFrom(p *pb.EgressPolicy) (egress.Policy, error) {
	var e egress.Policy
	switch p.GetMode() {
	case pb.EgressPolicy_MODE_UNSPECIFIED, pb.EgressPolicy_MODE_ALLOW_ALL:
		e.Mode = egress.AllowAll
	case pb.EgressPolicy_MODE_DENY_ALL:
		e.Mode = egress.DenyAll
	case pb.EgressPolicy_MODE_ALLOW_LIST:
		e.Mode = egress.AllowList
	default:
		return e, fmt.Errorf("%w: unknown egress mode %v", sandbox.ErrInvalid, p.GetMode())
	}
	for _, list := range []struct {
		in  []string
		out *[]netip.Prefix
	}{{p.GetAllowCidrs(), &e.Allow}, {p.GetDenyCidrs(), &e.Deny}} {
		for _, c := range list.in {
			prefix, err := parsePrefix(c)
			if err != nil {
				return e, fmt.Errorf("%w: egress CIDR %q: %v", sandbox.ErrInvalid, c, err)
			}
			*list.out = append(*list.out, prefix)
		}
	}
	if err := e.Validate(); err != nil {
		return e, fmt.Errorf("%w: %v", sandbox.ErrInvalid, err)
	}
	return e, nil
}

func seconds(n int32) (time.Duration, error) {
	if n < 0 {
		return 0, fmt.Errorf("%w: timeout_seconds must not be negative", sandbox.ErrInvalid)
	}
	return time.Duration(n) * time.Second, nil
}

// GetHostInfo reports the host's capacity and software.
func (s *Server) GetHostInfo(_ context.Context, _ *connect.Request[pb.GetHostInfoRequest]) (*connect.Response[pb.GetHostInfoResponse], error) {
	res := &pb.GetHostInfoResponse{Arch: runtime.GOARCH, Cpus: int32(runtime.NumCPU()), Vmm: s.cfg.VMM, Accelerator: s.cfg.Accel, Version: s.cfg.Version}
	res.MemoryBytes, _ = procfs.Mem("MemTotal")
	var st unix.Statfs_t
	if unix.Statfs(s.cfg.WrennDir, &st) == nil {
		res.DiskBytes = int64(st.Blocks) * st.Bsize
		res.DiskFreeBytes = int64(st.Bavail) * st.Bsize
	}
	if all, err := (template.Store{Dir: s.cfg.WrennDir + "/images"}).List(); err == nil {
		for _, t := range all {
			if sandbox.IsForkTemplate(t.Name) {
				continue // a fork's own, not one to start sandboxes from
			}
			res.Templates = append(res.Templates, t.Name)
			res.TemplateDetails = append(res.TemplateDetails, templateProto(t))
		}
	}
	res.WarmPools = s.poolStatus()
	return connect.NewResponse(res), nil
}

// CreateSandbox boots a sandbox and answers once envd in it is ready.
func (s *Server) CreateSandbox(ctx context.Context, req *connect.Request[pb.CreateSandboxRequest]) (*connect.Response[pb.CreateSandboxResponse], error) {
	msg := req.Msg
	timeout, err := seconds(msg.GetTimeoutSeconds())
	if err != nil {
		return nil, toConnect(err)
	}
	policy, err := egressFrom(msg.GetEgress())
	if err != nil {
		return nil, toConnect(err)
	}
	rec, err := s.m.Create(ctx, sandbox.CreateParams{
		ID: msg.GetId(), Template: msg.GetTemplate(), VCPUs: int(msg.GetVcpus()), MemoryMiB: int(msg.GetMemoryMib()), DiskMiB: int(msg.GetDiskSizeMib()),
		Timeout: timeout, AutoPause: msg.GetAutoPause(), EnvVars: msg.GetEnvVars(), Metadata: msg.GetMetadata(), Egress: policy,
	})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.CreateSandboxResponse{Sandbox: toProto(rec), EnvdAccessToken: rec.EnvdToken}), nil
}

// ForkSandbox starts new sandboxes with a running sandbox's memory and disk.
func (s *Server) ForkSandbox(ctx context.Context, req *connect.Request[pb.ForkSandboxRequest]) (*connect.Response[pb.ForkSandboxResponse], error) {
	timeout, err := seconds(req.Msg.GetTimeoutSeconds())
	if err != nil {
		return nil, toConnect(err)
	}
	recs, err := s.m.Fork(ctx, req.Msg.GetSourceId(), req.Msg.GetIds(), timeout, req.Msg.GetAutoPause())
	if err != nil {
		return nil, toConnect(err)
	}
	res := &pb.ForkSandboxResponse{}
	for _, r := range recs {
		res.Sandboxes = append(res.Sandboxes, &pb.CreateSandboxResponse{Sandbox: toProto(r), EnvdAccessToken: r.EnvdToken})
	}
	return connect.NewResponse(res), nil
}

// DestroySandbox removes a sandbox; a missing one is not an error.
func (s *Server) DestroySandbox(ctx context.Context, req *connect.Request[pb.DestroySandboxRequest]) (*connect.Response[pb.DestroySandboxResponse], error) {
	if req.Msg.GetId() == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("id is required"))
	}
	if err := s.m.Destroy(ctx, req.Msg.GetId()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.DestroySandboxResponse{}), nil
}

// PauseSandbox snapshots a running sandbox.
func (s *Server) PauseSandbox(ctx context.Context, req *connect.Request[pb.PauseSandboxRequest]) (*connect.Response[pb.PauseSandboxResponse], error) {
	rec, err := s.m.Pause(ctx, req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.PauseSandboxResponse{Sandbox: toProto(rec)}), nil
}

// ResumeSandbox restores a paused sandbox.
func (s *Server) ResumeSandbox(ctx context.Context, req *connect.Request[pb.ResumeSandboxRequest]) (*connect.Response[pb.ResumeSandboxResponse], error) {
	timeout, err := seconds(req.Msg.GetTimeoutSeconds())
	if err != nil {
		return nil, toConnect(err)
	}
	rec, err := s.m.Resume(ctx, req.Msg.GetId(), timeout)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.ResumeSandboxResponse{Sandbox: toProto(rec)}), nil
}

// GetSandbox returns one sandbox.
func (s *Server) GetSandbox(_ context.Context, req *connect.Request[pb.GetSandboxRequest]) (*connect.Response[pb.GetSandboxResponse], error) {
	rec, err := s.m.Get(req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.GetSandboxResponse{Sandbox: toProto(rec)}), nil
}

// ListSandboxes returns every sandbox on this host, without their
// metadata (GetSandbox has it): a host's whole list must fit one message
// however much metadata its tenants attach.
func (s *Server) ListSandboxes(_ context.Context, _ *connect.Request[pb.ListSandboxesRequest]) (*connect.Response[pb.ListSandboxesResponse], error) {
	res := &pb.ListSandboxesResponse{}
	for _, r := range s.m.List() {
		sb := toProto(r)
		sb.Metadata = nil
		res.Sandboxes = append(res.Sandboxes, sb)
	}
	return connect.NewResponse(res), nil
}

// PingSandbox moves a sandbox's deadline.
func (s *Server) PingSandbox(ctx context.Context, req *connect.Request[pb.PingSandboxRequest]) (*connect.Response[pb.PingSandboxResponse], error) {
	timeout, err := seconds(req.Msg.GetTimeoutSeconds())
	if err != nil {
		return nil, toConnect(err)
	}
	rec, err := s.m.Ping(ctx, req.Msg.GetId(), timeout)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.PingSandboxResponse{Sandbox: toProto(rec)}), nil
}

// GetSandboxMetrics reads the guest's figures and the VMM's memory, with
// the newest host-side sample; with a range, only that tier of samples.
func (s *Server) GetSandboxMetrics(ctx context.Context, req *connect.Request[pb.GetSandboxMetricsRequest]) (*connect.Response[pb.GetSandboxMetricsResponse], error) {
	rec, err := s.m.Get(req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	out := &pb.GetSandboxMetricsResponse{VmmRssBytes: procfs.RSS(rec.VMM.PID)}
	series := s.samples.Series(rec.ID)
	var pts []metrics.Point
	switch req.Msg.GetRange() {
	case "":
		c, err := s.m.Envd(rec.ID)
		if err != nil {
			return nil, toConnect(err)
		}
		m, err := c.Metrics(ctx)
		if err != nil {
			return nil, toConnect(err)
		}
		out.CpuCount, out.CpuUsedPct, out.MemTotalBytes, out.MemUsedBytes = int32(m.CPUCount), m.CPUUsedPct, m.MemTotal, m.MemUsed
		out.DiskTotalBytes, out.DiskUsedBytes = m.DiskTotal, m.DiskUsed
		if series != nil {
			if last, ok := series.Last(); ok {
				pts = []metrics.Point{last}
			}
		}
	case "10m", "2h", "24h":
		if series != nil {
			pts = series.Points(map[string]metrics.Tier{"10m": metrics.Fine, "2h": metrics.Medium, "24h": metrics.Coarse}[req.Msg.GetRange()])
		}
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("range %q: expected 10m, 2h or 24h", req.Msg.GetRange()))
	}
	for _, p := range pts {
		out.Points = append(out.Points, &pb.MetricPoint{TimestampUnixMs: p.At.UnixMilli(), CpuPct: p.CPUPct, MemBytes: p.MemBytes, DiskBytes: p.DiskBytes})
	}
	return connect.NewResponse(out), nil
}

// running lists the sandboxes the metrics sampler follows.
func (s *Server) running() []metrics.Target {
	var out []metrics.Target
	for _, rec := range s.m.List() {
		if rec.State == sandbox.Running && rec.VMM.PID > 0 {
			out = append(out, metrics.Target{ID: rec.ID, PID: rec.VMM.PID, VCPUs: rec.VCPUs, DiskFile: rec.DiskFile})
		}
	}
	return out
}

// ListPorts asks envd which ports servers in the sandbox listen on.
func (s *Server) ListPorts(ctx context.Context, req *connect.Request[pb.ListPortsRequest]) (*connect.Response[pb.ListPortsResponse], error) {
	rec, err := s.m.Get(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	c, err := s.m.Envd(rec.ID)
	if err != nil {
		return nil, toConnect(err)
	}
	ports, err := c.Ports(ctx)
	if err != nil {
		return nil, toConnect(err)
	}
	out := &pb.ListPortsResponse{}
	for _, p := range ports {
		if len(out.Ports) == maxPorts {
			break
		}
		addrs := p.Addresses
		if len(addrs) > 8 {
			addrs = addrs[:8]
		}
		for i, a := range addrs {
			addrs[i] = safetext.Clip(a, 64)
		}
		out.Ports = append(out.Ports, &pb.Port{Port: uint32(p.Port), Addresses: addrs, Forwarded: p.Forwarded,
			Pid: int32(p.PID), Command: safetext.Clip(p.Command, 64)})
	}
	return connect.NewResponse(out), nil
}

func execSpec(msg *pb.ExecRequest) (envdclient.ExecSpec, error) {
	if strings.TrimSpace(msg.GetCmd()) == "" {
		return envdclient.ExecSpec{}, fmt.Errorf("%w: cmd is required", sandbox.ErrInvalid)
	}
	if len(msg.GetStdin()) > maxFileBytes {
		return envdclient.ExecSpec{}, fmt.Errorf("%w: stdin larger than %d bytes", sandbox.ErrInvalid, maxFileBytes)
	}
	spec := envdclient.ExecSpec{Cmd: msg.GetCmd(), Args: msg.GetArgs(), Env: msg.GetEnv(), Cwd: msg.GetCwd(), User: msg.GetUser(), Stdin: msg.GetStdin(), Tag: msg.GetTag(),
		KeepStdin: msg.GetKeepStdin()}
	if p := msg.GetPty(); p != nil {
		spec.PTY = &envdclient.PTYSize{Cols: p.GetCols(), Rows: p.GetRows()}
	}
	return spec, nil
}

// Exec runs a command to its end and returns its output.
func (s *Server) Exec(ctx context.Context, req *connect.Request[pb.ExecRequest]) (*connect.Response[pb.ExecResponse], error) {
	spec, err := execSpec(req.Msg)
	if err != nil {
		return nil, toConnect(err)
	}
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	limit := defaultExecTime
	if n := req.Msg.GetTimeoutSeconds(); n > 0 {
		limit = time.Duration(n) * time.Second
	}
	// A foreground command dies with its call: at its timeout, or when
	// the caller goes away.
	spec.KillOnCancel = true
	ctx, timedOut, stop := commandTimer(ctx, limit)
	defer stop()
	release, err := c.HoldOutput(ctx)
	if err != nil {
		return nil, connect.NewError(connect.CodeDeadlineExceeded, err)
	}
	defer release()
	var stdout, stderr bytes.Buffer
	res := &pb.ExecResponse{}
	err = c.Exec(ctx, spec, func(ev envdclient.ExecEvent) error {
		for _, part := range []struct {
			buf  *bytes.Buffer
			data []byte
		}{{&stdout, ev.Stdout}, {&stderr, ev.Stderr}} {
			room := maxExecOutput - part.buf.Len()
			if len(part.data) > room {
				part.data, res.Truncated = part.data[:max(room, 0)], true
			}
			part.buf.Write(part.data)
		}
		if ev.ExitCode != nil {
			res.ExitCode = *ev.ExitCode
		}
		return nil
	})
	res.Stdout, res.Stderr = stdout.Bytes(), stderr.Bytes()
	if err != nil {
		if timedOut() {
			// Its own timeout: an answer, with what it wrote until then.
			res.TimedOut, res.ExitCode = true, -1
			s.log.Info("command timed out and was killed", "sandbox", req.Msg.GetSandboxId(), "cmd", spec.Cmd, "timeout", limit)
			return connect.NewResponse(res), nil
		}
		return nil, toConnect(err)
	}
	return connect.NewResponse(res), nil
}

// ExecStream runs a command and streams its output as it comes.
func (s *Server) ExecStream(ctx context.Context, req *connect.Request[pb.ExecRequest], stream *connect.ServerStream[pb.ExecStreamResponse]) error {
	spec, err := execSpec(req.Msg)
	if err != nil {
		return toConnect(err)
	}
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return toConnect(err)
	}
	timedOut := func() bool { return false }
	if n := req.Msg.GetTimeoutSeconds(); n > 0 {
		var stop func()
		ctx, timedOut, stop = commandTimer(ctx, time.Duration(n)*time.Second)
		defer stop()
	}
	// A terminal session keeps stdin open for SendInput, and outlives its
	// stream (a client may leave it and join again); a command dies with
	// its stream or at its timeout.
	spec.KeepStdin = spec.KeepStdin || spec.PTY != nil
	spec.KillOnCancel = spec.PTY == nil
	err = c.Exec(ctx, spec, relay(stream))
	if err != nil && timedOut() {
		s.log.Info("streamed command timed out and was killed", "sandbox", req.Msg.GetSandboxId(), "cmd", spec.Cmd)
		return stream.Send(&pb.ExecStreamResponse{Event: &pb.ExecStreamResponse_TimedOut{TimedOut: true}})
	}
	return toConnect(err)
}

// errCommandTimeout ends a command that ran past its timeout.
var errCommandTimeout = errors.New("the command's timeout passed")

// commandTimer ends ctx once limit has passed; timedOut reports whether
// that (not the caller) ended it. It is a timer, not a deadline: a
// deadline travels to envd with the request, and envd's side ending the
// stream a moment before ours would read as envd failing instead of the
// command's timeout.
func commandTimer(parent context.Context, limit time.Duration) (ctx context.Context, timedOut func() bool, stop func()) {
	ctx, cancel := context.WithCancelCause(parent)
	t := time.AfterFunc(limit, func() { cancel(errCommandTimeout) })
	timedOut = func() bool { return errors.Is(context.Cause(ctx), errCommandTimeout) }
	return ctx, timedOut, func() {
		t.Stop()
		cancel(nil)
	}
}

// relay forwards process events to a client stream.
func relay(stream *connect.ServerStream[pb.ExecStreamResponse]) func(envdclient.ExecEvent) error {
	return func(ev envdclient.ExecEvent) error {
		var out *pb.ExecStreamResponse
		switch {
		case ev.PID != 0:
			out = &pb.ExecStreamResponse{Event: &pb.ExecStreamResponse_Pid{Pid: ev.PID}}
		case len(ev.Stdout) > 0:
			out = &pb.ExecStreamResponse{Event: &pb.ExecStreamResponse_Stdout{Stdout: ev.Stdout}}
		case len(ev.Stderr) > 0:
			out = &pb.ExecStreamResponse{Event: &pb.ExecStreamResponse_Stderr{Stderr: ev.Stderr}}
		case len(ev.PTY) > 0:
			out = &pb.ExecStreamResponse{Event: &pb.ExecStreamResponse_Pty{Pty: ev.PTY}}
		case ev.ExitCode != nil:
			out = &pb.ExecStreamResponse{Event: &pb.ExecStreamResponse_ExitCode{ExitCode: *ev.ExitCode}}
		default:
			return nil
		}
		return stream.Send(out)
	}
}

// ReadFile returns a file's content (up to 64 MiB).
func (s *Server) ReadFile(ctx context.Context, req *connect.Request[pb.ReadFileRequest]) (*connect.Response[pb.ReadFileResponse], error) {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	data, err := c.ReadFile(ctx, req.Msg.GetPath(), req.Msg.GetUser(), maxFileBytes)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.ReadFileResponse{Content: data}), nil
}

// WriteFile writes a file, creating its parents.
func (s *Server) WriteFile(ctx context.Context, req *connect.Request[pb.WriteFileRequest]) (*connect.Response[pb.WriteFileResponse], error) {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	if err := c.WriteFile(ctx, req.Msg.GetPath(), req.Msg.GetUser(), bytes.NewReader(req.Msg.GetContent())); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.WriteFileResponse{}), nil
}

// ListDir lists a directory.
func (s *Server) ListDir(ctx context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	entries, err := c.ListDir(ctx, req.Msg.GetPath(), req.Msg.GetUser(), req.Msg.GetDepth())
	if err != nil {
		return nil, toConnect(err)
	}
	res := &pb.ListDirResponse{}
	for _, e := range entries {
		typ := "file"
		switch e.GetType() {
		case fspb.FileType_FILE_TYPE_DIRECTORY:
			typ = "directory"
		case fspb.FileType_FILE_TYPE_SYMLINK:
			typ = "symlink"
		}
		res.Entries = append(res.Entries, &pb.FileEntry{
			Name: e.GetName(), Path: e.GetPath(), IsDir: e.GetType() == fspb.FileType_FILE_TYPE_DIRECTORY,
			Size: e.GetSize(), Mode: e.GetMode(), ModifiedAt: e.GetModifiedTime(), Type: typ,
			Permissions: e.GetPermissions(), Owner: e.GetOwner(), Group: e.GetGroup(), SymlinkTarget: e.SymlinkTarget,
		})
	}
	return connect.NewResponse(res), nil
}

// MakeDir creates a directory.
func (s *Server) MakeDir(ctx context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	if err := c.MakeDir(ctx, req.Msg.GetPath(), req.Msg.GetUser()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.MakeDirResponse{}), nil
}

// RemovePath deletes a file or directory tree.
func (s *Server) RemovePath(ctx context.Context, req *connect.Request[pb.RemovePathRequest]) (*connect.Response[pb.RemovePathResponse], error) {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	if err := c.Remove(ctx, req.Msg.GetPath(), req.Msg.GetUser()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.RemovePathResponse{}), nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func templateProto(m template.Metadata) *pb.Template {
	t := &pb.Template{Name: m.Name, SizeBytes: m.SizeBytes, Parent: m.Parent, Source: m.Source, CreatedAt: timestamppb.New(m.Created), Sha256: m.SHA256}
	if mem := m.Memory; mem != nil {
		t.Memory = &pb.TemplateMemory{Vmm: mem.VMM, Vcpus: int32(mem.VCPUs), MemoryMib: int32(mem.MemoryMiB), DiskSizeMib: int32(mem.DiskMiB), Kernel: mem.Kernel, SizeBytes: mem.SizeBytes}
	}
	return t
}

// CreateSnapshot saves a sandbox's disk, and its memory when the VMM can
// start sandboxes from it, as a template.
func (s *Server) CreateSnapshot(ctx context.Context, req *connect.Request[pb.CreateSnapshotRequest]) (*connect.Response[pb.CreateSnapshotResponse], error) {
	meta, err := s.m.SaveAsTemplate(ctx, req.Msg.GetSandboxId(), req.Msg.GetName(), "snapshot", true)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.CreateSnapshotResponse{Template: templateProto(meta)}), nil
}

// DeleteSnapshot removes a template.
func (s *Server) DeleteSnapshot(_ context.Context, req *connect.Request[pb.DeleteSnapshotRequest]) (*connect.Response[pb.DeleteSnapshotResponse], error) {
	if err := s.m.DeleteTemplate(req.Msg.GetName()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.DeleteSnapshotResponse{}), nil
}

// FlattenRootfs turns a build sandbox's disk, and with_memory its memory,
// into a template.
func (s *Server) FlattenRootfs(ctx context.Context, req *connect.Request[pb.FlattenRootfsRequest]) (*connect.Response[pb.FlattenRootfsResponse], error) {
	meta, err := s.m.SaveAsTemplate(ctx, req.Msg.GetSandboxId(), req.Msg.GetName(), "build", req.Msg.GetWithMemory())
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.FlattenRootfsResponse{Template: templateProto(meta)}), nil
}

// fileChunk is the size of one streamed piece of a file.
const fileChunk = 256 << 10

// ReadFileStream sends a file in chunks.
func (s *Server) ReadFileStream(ctx context.Context, req *connect.Request[pb.ReadFileRequest], stream *connect.ServerStream[pb.FileChunk]) error {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return toConnect(err)
	}
	body, err := c.OpenFile(ctx, req.Msg.GetPath(), req.Msg.GetUser())
	if err != nil {
		return toConnect(err)
	}
	defer body.Close()
	buf := make([]byte, fileChunk)
	for {
		n, err := io.ReadFull(body, buf)
		if n > 0 {
			if serr := stream.Send(&pb.FileChunk{Data: buf[:n]}); serr != nil {
				return serr
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("read %s: %w", req.Msg.GetPath(), err))
		}
	}
}

// WriteFileStream writes a file from chunks; the file appears only once
// all of it arrived (envd writes to a temporary file and renames it).
func (s *Server) WriteFileStream(ctx context.Context, stream *connect.ClientStream[pb.WriteFileStreamRequest]) (*connect.Response[pb.WriteFileResponse], error) {
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("empty stream: the first message must name the file"))
	}
	head := stream.Msg().GetHeader()
	if head == nil || head.GetPath() == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("the first message must be a header with sandbox_id and path"))
	}
	c, err := s.m.Envd(head.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	pr, pw := io.Pipe()
	go func() {
		for stream.Receive() {
			if _, err := pw.Write(stream.Msg().GetData()); err != nil {
				return
			}
		}
		// A broken client stream must not leave a complete-looking file.
		pw.CloseWithError(stream.Err())
	}()
	err = c.WriteFile(ctx, head.GetPath(), head.GetUser(), pr)
	pr.CloseWithError(err) // unblock the receiver if envd gave up
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.WriteFileResponse{}), nil
}

// SetWarmPools takes the control plane's warm-pool settings and reports
// every pool on the host.
func (s *Server) SetWarmPools(_ context.Context, req *connect.Request[pb.SetWarmPoolsRequest]) (*connect.Response[pb.SetWarmPoolsResponse], error) {
	if len(req.Msg.GetPools()) > 1024 {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("at most 1024 warm pools"))
	}
	specs := make([]sandbox.PoolSpec, 0, len(req.Msg.GetPools()))
	for _, p := range req.Msg.GetPools() {
		specs = append(specs, sandbox.PoolSpec{Template: p.GetTemplate(), Size: int(p.GetSize()),
			VCPUs: int(p.GetVcpus()), MemoryMiB: int(p.GetMemoryMib()), DiskMiB: int(p.GetDiskSizeMib())})
	}
	if err := s.m.SetPools(specs); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.SetWarmPoolsResponse{Pools: s.poolStatus()}), nil
}

func (s *Server) poolStatus() []*pb.WarmPoolStatus {
	var out []*pb.WarmPoolStatus
	for _, st := range s.m.Pools() {
		out = append(out, &pb.WarmPoolStatus{
			Pool:  &pb.WarmPool{Template: st.Template, Size: int32(st.Size), Vcpus: int32(st.VCPUs), MemoryMib: int32(st.MemoryMiB), DiskSizeMib: int32(st.DiskMiB)},
			Ready: int32(st.Ready), Starting: int32(st.Starting), Claims: st.Claims, Misses: st.Misses, Note: st.Note})
	}
	return out
}
