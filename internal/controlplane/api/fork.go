package api

import (
	"context"
	"errors"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// maxFork is the most capsules one fork makes (the agent's bound).
const maxFork = 16

// fork makes count new capsules with a running capsule's memory and disk as
// they are now, on its host; the capsule pauses only for the copy. Each
// has its shape, metadata, egress and ingress settings, and its own id and
// tokens. All or nothing.
func (s *Server) fork(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Count *int `json:"count"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	count := 1
	if req.Count != nil {
		count = *req.Count
	}
	if count < 1 || count > maxFork {
		return badRequest("count must be between 1 and %d", maxFork)
	}
	src, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	ctx := r.Context()
	children, err := s.forkInto(ctx, p, src, c, count, nil)
	if err != nil {
		return err
	}
	out := make([]capsuleJSON, 0, count)
	for _, cur := range children {
		j, err := s.withTokens(ctx, s.toCapsule(cur))
		if err != nil {
			return err
		}
		out = append(out, j)
	}
	writeJSON(w, http.StatusCreated, map[string]any{"capsules": out})
	return nil
}

// forkInto makes count capsules from src as it is now, on its host, all
// or nothing. endAt, when set, is the children's absolute deadline (E2B's
// fork timeout); otherwise they have src's timeout and auto-pause.
func (s *Server) forkInto(ctx context.Context, p *principal, src store.Sandbox, c agentclient.Client, count int, endAt *time.Time) ([]store.Sandbox, error) {
	actor, _ := p.actor()
	var made []store.Sandbox
	fail := func(msg string) {
		for _, sb := range made {
			_, _ = s.st.Transition(context.WithoutCancel(ctx), sb.ID, []string{"starting"}, "error", map[string]any{"error": msg, "stopped_at": store.Now})
		}
	}
	for range count {
		sb := store.Sandbox{ID: ids.New("sb"), TeamID: p.TeamID, HostID: src.HostID, Template: src.Template, Status: "starting",
			VCPUs: src.VCPUs, MemoryMB: src.MemoryMB, DiskSizeMB: src.DiskSizeMB, TimeoutSec: src.TimeoutSec, AutoPause: src.AutoPause,
			Metadata: src.Metadata, Egress: src.Egress, Public: src.Public, AutoResume: src.AutoResume, CreatedBy: &actor}
		if endAt != nil {
			sb.TimeoutSec, sb.EndAt = 0, endAt
		}
		stored, err := s.st.InsertSandboxWithin(ctx, sb, s.cfg.Quotas)
		if err != nil {
			fail("the fork was refused: " + err.Error())
			s.audit(ctx, p, p.TeamID, "capsule", src.ID, "capsule.fork", err, map[string]any{"count": count})
			return nil, err
		}
		made = append(made, stored)
	}
	in := &pb.ForkSandboxRequest{SourceId: src.ID, TimeoutSeconds: maxTimeoutSec, AutoPause: true}
	for _, sb := range made {
		in.Ids = append(in.Ids, sb.ID)
	}
	resp, err := c.ForkSandbox(ctx, connect.NewRequest(in))
	if err != nil {
		fail("fork of " + src.ID + " failed: " + agentclient.Message(err))
		s.audit(ctx, p, p.TeamID, "capsule", src.ID, "capsule.fork", err, map[string]any{"count": count})
		return nil, err
	}
	children := make([]store.Sandbox, 0, count)
	for i, child := range resp.Msg.GetSandboxes() {
		if i >= len(made) || child.GetSandbox().GetId() != made[i].ID {
			return nil, errors.New("the host agent answered the fork with other capsules than asked")
		}
		cur, err := s.st.Transition(context.WithoutCancel(ctx), made[i].ID, []string{"starting"}, "running", startedColumns(child))
		if err != nil {
			// Destroyed while starting: do not leave its VM behind.
			_, _ = c.DestroySandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.DestroySandboxRequest{Id: made[i].ID}))
			return nil, err
		}
		children = append(children, cur)
	}
	s.audit(ctx, p, p.TeamID, "capsule", src.ID, "capsule.fork", nil, map[string]any{"count": count, "capsules": in.Ids})
	s.log.Info("capsule forked", "capsule", src.ID, "into", in.Ids)
	return children, nil
}
