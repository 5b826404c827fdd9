package api

import (
	"context"
	"errors"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

type templateJSON struct {
	Name      string            `json:"name"`
	Type      string            `json:"type"`
	VCPUs     *int32            `json:"vcpus"`
	MemoryMB  *int32            `json:"memory_mb"`
	SizeBytes int64             `json:"size_bytes"`
	CreatedAt time.Time         `json:"created_at"`
	Platform  bool              `json:"platform"`
	Metadata  map[string]string `json:"metadata"`
	// HasMemory: the template holds a VM's memory (MemoryBytes of it), and
	// capsules of its vcpus and memory_mb start from it instead of booting.
	HasMemory   bool  `json:"has_memory"`
	MemoryBytes int64 `json:"memory_bytes"`
	// WarmPoolSize is how many ready capsules of it each host keeps (null:
	// the hosts' own --warm-pools setting).
	WarmPoolSize *int32 `json:"warm_pool_size"`
}

func toTemplate(t store.Template) templateJSON {
	return templateJSON{Name: t.Name, Type: t.Type, VCPUs: t.VCPUs, MemoryMB: t.MemoryMB, SizeBytes: t.SizeBytes,
		CreatedAt: t.CreatedAt, Platform: t.TeamID == nil, Metadata: t.Metadata, HasMemory: t.MemoryBytes > 0, MemoryBytes: t.MemoryBytes,
		WarmPoolSize: t.WarmPoolSize}
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request, p *principal) error {
	typ := r.URL.Query().Get("type")
	if typ != "" && typ != "base" && typ != "snapshot" {
		return badRequest("type must be base or snapshot")
	}
	ts, err := s.st.Templates(r.Context(), p.TeamID, typ)
	if err != nil {
		return err
	}
	out := make([]templateJSON, 0, len(ts))
	for _, t := range ts {
		out = append(out, toTemplate(t))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// createSnapshot saves a running capsule (memory and disk) as a team
// template; the capsule keeps running.
func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		SandboxID string `json:"sandbox_id"`
		Name      string `json:"name"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.SandboxID == "" {
		return badRequest("sandbox_id is required")
	}
	t, err := s.snapshotCapsule(r, p, req.SandboxID, req.Name, false, r.URL.Query().Get("overwrite") == "true")
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, toTemplate(t))
	return nil
}

// snapshotCapsule saves a capsule of p's team as a template: the team's,
// or (global, for the platform team) one every team can use. overwrite
// replaces a snapshot template of the same name (never a base one).
func (s *Server) snapshotCapsule(r *http.Request, p *principal, sandboxID, name string, global, overwrite bool) (store.Template, error) {
	if name == "" {
		name = "snapshot-" + auth.RandomString(8)
	}
	if !templateNameRE.MatchString(name) {
		return store.Template{}, badRequest("name must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	ctx := r.Context()
	if existing, err := s.st.TemplateByName(ctx, p.TeamID, name); err == nil {
		mine := existing.TeamID != nil || (global && existing.Type == "snapshot")
		if !mine || !overwrite {
			return store.Template{}, conflict("a template named %q already exists", name)
		}
		if existing.TeamID == nil {
			err = s.removePlatformTemplate(ctx, p, existing, map[string]any{"reason": "overwritten"})
		} else {
			err = s.removeTemplate(r, p, existing)
		}
		if err != nil {
			return store.Template{}, err
		}
	}
	r.SetPathValue("id", sandboxID)
	// Running or paused: a paused capsule's memory is its pause snapshot.
	sb, err := s.capsule(r, p)
	if err != nil {
		return store.Template{}, err
	}
	var c agentclient.Client
	if sb.Status == "paused" && sb.HostID != nil {
		c, _, err = s.agentFor(ctx, *sb.HostID)
	} else {
		sb, c, err = s.running(r, p)
	}
	if err != nil {
		return store.Template{}, err
	}
	id := ids.New("tpl")
	resp, err := c.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: sb.ID, Name: id}))
	if err != nil {
		s.audit(ctx, p, p.TeamID, "template", id, "template.snapshot_create", err, map[string]any{"name": name, "capsule": sb.ID, "global": global})
		return store.Template{}, err
	}
	owner := &p.TeamID
	if global {
		owner = nil
	}
	t, err := s.st.InsertTemplate(ctx, store.Template{ID: id, TeamID: owner, Name: name, Type: "snapshot", VCPUs: &sb.VCPUs,
		MemoryMB: &sb.MemoryMB, SizeBytes: resp.Msg.GetTemplate().GetSizeBytes(), HostID: sb.HostID, SourceSandboxID: &sb.ID,
		MemoryBytes: resp.Msg.GetTemplate().GetMemory().GetSizeBytes()})
	if err != nil {
		// Do not leave files on the host that no record points to.
		_, _ = c.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: id}))
		if errors.Is(err, store.ErrConflict) {
			return store.Template{}, conflict("a template named %q already exists", name)
		}
		return store.Template{}, err
	}
	s.audit(ctx, p, p.TeamID, "template", id, "template.snapshot_create", nil, map[string]any{"name": name, "capsule": sb.ID, "global": global})
	return t, nil
}

func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request, p *principal) error {
	t, err := s.st.TemplateByName(r.Context(), p.TeamID, r.PathValue("name"))
	if errors.Is(err, store.ErrNotFound) || (err == nil && t.TeamID == nil) {
		return notFound("template") // platform templates are not the team's to delete
	}
	if err != nil {
		return err
	}
	if err := s.removeTemplate(r, p, t); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// removeTemplate deletes the record, then the files on the host.
func (s *Server) removeTemplate(r *http.Request, p *principal, t store.Template) error {
	ctx := r.Context()
	if _, err := s.st.DeleteTemplate(ctx, p.TeamID, t.Name); err != nil {
		return err
	}
	s.removeTemplateFiles(ctx, t)
	s.audit(ctx, p, p.TeamID, "template", t.ID, "template.snapshot_delete", nil, map[string]any{"name": t.Name})
	return nil
}

// removeTemplateFiles deletes a template's files from the host that made
// it, once its record is gone.
func (s *Server) removeTemplateFiles(ctx context.Context, t store.Template) {
	if t.HostID == nil {
		return
	}
	var herr error
	if c, _, err := s.agentFor(ctx, *t.HostID); err != nil {
		herr = err
	} else if _, err := c.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: t.ID})); err != nil && connect.CodeOf(err) != connect.CodeNotFound {
		herr = err
	}
	if herr != nil {
		s.log.Warn("template record deleted but its files stay on the host", "template", t.ID, "host", t.HostID, "err", herr)
	}
}
