package server

import (
	"context"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/envdclient"
	envdpb "github.com/wrenn/wrenn/proto/envd/process"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// process resolves a ProcessRef to its sandbox's envd and selector.
func (s *Server) process(ref *pb.ProcessRef) (*envdclient.Client, *envdpb.ProcessSelector, error) {
	sel, err := envdclient.Selector(ref.GetPid(), ref.GetTag())
	if err != nil {
		return nil, nil, err
	}
	c, err := s.m.Envd(ref.GetSandboxId())
	if err != nil {
		return nil, nil, toConnect(err)
	}
	return c, sel, nil
}

// StartProcess starts a background process and returns its pid at once.
func (s *Server) StartProcess(ctx context.Context, req *connect.Request[pb.ExecRequest]) (*connect.Response[pb.StartProcessResponse], error) {
	spec, err := execSpec(req.Msg)
	if err != nil {
		return nil, toConnect(err)
	}
	spec.KeepStdin = true
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	var pid uint32
	err = c.Exec(ctx, spec, func(ev envdclient.ExecEvent) error {
		if ev.PID != 0 {
			pid = ev.PID
			return envdclient.ErrStopFollowing // it runs on without us
		}
		return nil
	})
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.StartProcessResponse{Pid: pid}), nil
}

// ListProcesses lists the processes envd runs in a sandbox.
func (s *Server) ListProcesses(ctx context.Context, req *connect.Request[pb.ListProcessesRequest]) (*connect.Response[pb.ListProcessesResponse], error) {
	c, err := s.m.Envd(req.Msg.GetSandboxId())
	if err != nil {
		return nil, toConnect(err)
	}
	procs, err := c.List(ctx)
	if err != nil {
		return nil, toConnect(err)
	}
	res := &pb.ListProcessesResponse{}
	for _, p := range procs {
		res.Processes = append(res.Processes, &pb.ProcessInfo{
			Pid: p.GetPid(), Tag: p.GetTag(), Cmd: p.GetConfig().GetCmd(), Args: p.GetConfig().GetArgs(), Cwd: p.GetConfig().GetCwd(),
		})
	}
	return connect.NewResponse(res), nil
}

// ConnectProcess streams a running process's output until it ends.
func (s *Server) ConnectProcess(ctx context.Context, req *connect.Request[pb.ConnectProcessRequest], stream *connect.ServerStream[pb.ExecStreamResponse]) error {
	c, sel, err := s.process(req.Msg.GetProcess())
	if err != nil {
		return err
	}
	return toConnect(c.Connect(ctx, sel, relay(stream)))
}

// SendInput writes to a process's stdin or terminal.
func (s *Server) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	c, sel, err := s.process(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	// envd writes to whichever the process has, its terminal or its stdin.
	if err := c.SendInput(ctx, sel, req.Msg.GetData(), false, req.Msg.GetCloseStdin()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

// ResizePty changes a terminal session's size.
func (s *Server) ResizePty(ctx context.Context, req *connect.Request[pb.ResizePtyRequest]) (*connect.Response[pb.ResizePtyResponse], error) {
	c, sel, err := s.process(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	size := req.Msg.GetSize()
	if err := c.Resize(ctx, sel, envdclient.PTYSize{Cols: size.GetCols(), Rows: size.GetRows()}); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.ResizePtyResponse{}), nil
}

// KillProcess ends a process (and its process group).
func (s *Server) KillProcess(ctx context.Context, req *connect.Request[pb.KillProcessRequest]) (*connect.Response[pb.KillProcessResponse], error) {
	c, sel, err := s.process(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := c.Signal(ctx, sel, req.Msg.GetForce()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&pb.KillProcessResponse{}), nil
}
