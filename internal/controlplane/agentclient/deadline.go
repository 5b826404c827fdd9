package agentclient

import (
	"context"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// Deadlines every unary call to an agent gets when its caller set none,
// so a host that hangs holds up one request, never a replica's job loop.
const (
	// QuickCall bounds calls that only look or change a little.
	QuickCall = 30 * time.Second
	// DestroyCall bounds a destroy (a VMM to kill, a disk to delete).
	DestroyCall = 2 * time.Minute
	// VMCall bounds calls that boot, restore or write a VM's memory or disk.
	VMCall = 10 * time.Minute
)

// execGrace is what an Exec may take beyond its command's own timeout.
const execGrace = 30 * time.Second

// callDeadline is the default deadline of a unary procedure.
func callDeadline(procedure string, req any) time.Duration {
	name := procedure[strings.LastIndexByte(procedure, '/')+1:]
	switch name {
	case "CreateSandbox", "ForkSandbox", "PauseSandbox", "ResumeSandbox", "CreateSnapshot", "FlattenRootfs":
		return VMCall
	case "DestroySandbox", "DeleteSnapshot":
		return DestroyCall
	case "Exec":
		secs := 60 // the agent's default
		if r, ok := req.(*pb.ExecRequest); ok && r.GetTimeoutSeconds() > 0 {
			secs = int(r.GetTimeoutSeconds())
		}
		return time.Duration(secs)*time.Second + execGrace
	}
	return QuickCall
}

// deadlines is a connect interceptor that gives unary calls without a
// deadline callDeadline's; streams (a terminal, a file being moved) live
// as long as their caller's context.
type deadlines struct{}

func (deadlines) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, callDeadline(req.Spec().Procedure, req.Any()))
			defer cancel()
		}
		return next(ctx, req)
	}
}

func (deadlines) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (deadlines) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
