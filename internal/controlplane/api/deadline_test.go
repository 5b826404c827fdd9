package api

import (
	"context"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
)

// A capsule with E2B's absolute timeout ends about when it says, not at
// the next full reconcile pass.
func TestDeadlinesAreKeptBetweenPasses(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	c.startAgent(admin)
	key := c.apiKey(admin)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log,
		Interval: time.Hour, DeadlineInterval: 200 * time.Millisecond} // one pass now, then only the deadline checks
	go rec.Run(ctx)

	var sb struct {
		SandboxID string `json:"sandboxID"`
	}
	c.want(c.do("POST", "/sandboxes", creds{key: key}, map[string]any{"templateID": "minimal", "timeout": 3}), 201).json(t, &sb)
	ended := time.Now().Add(3 * time.Second)
	for {
		var got capsuleOut
		c.want(c.do("GET", "/v1/capsules/"+sb.SandboxID, creds{key: key}, nil), 200).json(t, &got)
		if got.Status == "stopped" {
			break
		}
		if time.Now().After(ended.Add(5 * time.Second)) {
			t.Fatalf("5 s past its timeout the capsule is %s", got.Status)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if late := time.Since(ended); late > 5*time.Second {
		t.Fatalf("stopped %v after its timeout", late)
	}
}
