package agentclient

import (
	"testing"
	"time"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

func TestCallDeadlines(t *testing.T) {
	for _, c := range []struct {
		procedure string
		req       any
		want      time.Duration
	}{
		{hostagentv2connect.HostAgentServicePauseSandboxProcedure, &pb.PauseSandboxRequest{}, VMCall},
		{hostagentv2connect.HostAgentServiceDestroySandboxProcedure, &pb.DestroySandboxRequest{}, DestroyCall},
		{hostagentv2connect.HostAgentServiceGetSandboxProcedure, &pb.GetSandboxRequest{}, QuickCall},
		{hostagentv2connect.HostAgentServiceExecProcedure, &pb.ExecRequest{}, 90 * time.Second},
		{hostagentv2connect.HostAgentServiceExecProcedure, &pb.ExecRequest{TimeoutSeconds: 600}, 630 * time.Second},
	} {
		if got := callDeadline(c.procedure, c.req); got != c.want {
			t.Errorf("%s: %v, want %v", c.procedure, got, c.want)
		}
	}
}
