package api

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// hungHost accepts connections and never answers, as an agent stopped in
// the middle of a call does.
func hungHost(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String()
}

// One host that hangs holds up nobody: while a replica's timeout pause
// of a capsule there waits, a capsule on a working host is paused, and a
// second replica takes over the reconciler and still marks a silent host
// unreachable.
func TestAHungHostStallsNothing(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	key := c.apiKey(admin)
	working, _ := c.startAgent(admin)

	// The hung host registers like any (its token is the only real part).
	hungID, token := c.newHostToken(admin)
	reg := withToken(token)
	reg["address"] = hungHost(t)
	c.want(c.do("POST", "/v1/hosts/register", creds{}, reg), 201)
	stuck, err := c.st.InsertSandbox(t.Context(), store.Sandbox{ID: "sb-onhunghost00000001", TeamID: admin.teamID, Template: "minimal", Status: "running",
		VCPUs: 1, MemoryMB: 256, HostID: &hungID, TimeoutSec: 60, AutoPause: true})
	if err != nil {
		t.Fatal(err)
	}
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256, "timeout_sec": 60, "auto_pause": true}), 201).json(t, &sb)
	if sb.HostID != working {
		t.Fatalf("the capsule went to %s, not the working host", sb.HostID)
	}
	// Both capsules are past their timeout now.
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE sandboxes SET last_active_at = now() - interval '1 hour' WHERE id IN ($1, $2)", stuck.ID, sb.ID); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log, Interval: time.Hour}
	go a.Run(ctx) // one pass now, the next in an hour
	deadline := time.Now().Add(90 * time.Second)
	for {
		var got capsuleOut
		c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
		if got.Status == "paused" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the capsule on the working host is %s: the hung host held up its pause", got.Status)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Its pause runs beside the other one: it may start a moment later on
	// a busy machine, and then waits on the hung host.
	for until := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		cur, err := c.st.Sandbox(t.Context(), admin.teamID, stuck.ID)
		if err == nil && cur.Status == "pausing" {
			break
		}
		if err != nil || cur.Status != "running" || time.Now().After(until) {
			t.Fatalf("the hung host's capsule: %+v %v (its pause should still be waiting)", cur.Status, err)
		}
	}

	// Another replica's pass runs meanwhile (the lock is free) and finds a
	// host that went silent.
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE hosts SET last_heartbeat_at = now() - interval '10 minutes' WHERE id = $1", hungID); err != nil {
		t.Fatal(err)
	}
	// (The first replica's deadline check paused the capsule before its
	// own pass let go of the lock, which waits up to 15 s on the hung
	// host: the second replica's pass runs once it is free.)
	b := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log}
	for free := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		start := time.Now()
		ran, err := b.Pass(context.Background())
		if err != nil {
			t.Fatalf("the second replica's pass: %v", err)
		}
		if took := time.Since(start); took > 30*time.Second {
			t.Fatalf("the second replica's pass took %v", took)
		}
		if ran {
			break
		}
		if time.Now().After(free) {
			t.Fatal("the first replica's pass still holds the lock after 30 s")
		}
	}
	h, err := c.st.Host(t.Context(), hungID)
	if err != nil || h.Status != "unreachable" {
		t.Fatalf("the silent host is %q (%v)", h.Status, err)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
}
