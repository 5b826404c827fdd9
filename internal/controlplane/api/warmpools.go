package api

import (
	"errors"
	"net/http"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Warm pool sizes a team may ask for its own templates, and platform
// admins for any (the agent's own bound).
const (
	maxTeamPoolSize     = 4
	maxPlatformPoolSize = 64
)

// setSnapshotPool sets how many ready capsules of a team's template its
// host keeps.
func (s *Server) setSnapshotPool(w http.ResponseWriter, r *http.Request, p *principal) error {
	t, err := s.st.TemplateByName(r.Context(), p.TeamID, r.PathValue("name"))
	if errors.Is(err, store.ErrNotFound) || (err == nil && t.TeamID == nil) {
		return notFound("template") // platform templates are set by platform admins
	}
	if err != nil {
		return err
	}
	return s.setPool(w, r, p, t, maxTeamPoolSize)
}

// adminSetTemplatePool sets a platform template's warm pool on every host.
func (s *Server) adminSetTemplatePool(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	t, err := s.st.TemplateByName(r.Context(), "", r.PathValue("name"))
	if errors.Is(err, store.ErrNotFound) || (err == nil && t.TeamID != nil) {
		return notFound("platform template")
	}
	if err != nil {
		return err
	}
	return s.setPool(w, r, p, t, maxPlatformPoolSize)
}

// setPool reads {"size": N} (null: leave it to the hosts) and stores it;
// hosts take it at the next reconcile pass.
func (s *Server) setPool(w http.ResponseWriter, r *http.Request, p *principal, t store.Template, limit int32) error {
	var req struct {
		Size *int32 `json:"size"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Size != nil && (*req.Size < 0 || *req.Size > limit) {
		return badRequest("size must be between 0 and %d (or null: the hosts' own setting)", limit)
	}
	ctx := r.Context()
	if err := s.st.SetWarmPoolSize(ctx, t.ID, req.Size); err != nil {
		return err
	}
	t.WarmPoolSize = req.Size
	s.audit(ctx, p, p.TeamID, "template", t.ID, "template.warm_pool", nil, map[string]any{"name": t.Name, "size": req.Size})
	writeJSON(w, http.StatusOK, toTemplate(t))
	return nil
}
