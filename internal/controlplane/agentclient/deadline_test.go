package agentclient

import (
	"testing"
	"time"

	pb "github.com/wrenn/wrenn/proto/hostagent/v1"
	"github.com/wrenn/wrenn/proto/hostagent/v1/hostagentv1connect"
)

func TestCallDeadlines(t *testing.T) {
	for _, c := range []struct {
		procedure string
		req       any
		want      time.Duration
	}{
		{hostagentv1connect.HostAgentServicePauseSandboxProcedure, &pb.PauseSandboxRequest{}, VMCall},
		{hostagentv1connect.HostAgentServiceDestroySandboxProcedure, &pb.DestroySandboxRequest{}, DestroyCall},
		{hostagentv1connect.HostAgentServiceGetSandboxProcedure, &pb.GetSandboxRequest{}, QuickCall},
		{hostagentv1connect.HostAgentServiceExecProcedure, &pb.ExecRequest{}, 90 * time.Second},
		{hostagentv1connect.HostAgentServiceExecProcedure, &pb.ExecRequest{TimeoutSeconds: 600}, 630 * time.Second},
	} {
		if got := callDeadline(c.procedure, c.req); got != c.want {
			t.Errorf("%s: %v, want %v", c.procedure, got, c.want)
		}
	}
}
