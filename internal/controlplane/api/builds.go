package api

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/recipe"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

type buildJSON struct {
	ID         string          `json:"id"`
	TeamID     string          `json:"team_id"`
	Platform   bool            `json:"platform"`
	Name       string          `json:"name"`
	Status     string          `json:"status"`
	Recipe     json.RawMessage `json:"recipe"`
	SandboxID  *string         `json:"sandbox_id"`
	Error      string          `json:"error"`
	CreatedAt  time.Time       `json:"created_at"`
	StartedAt  *time.Time      `json:"started_at"`
	FinishedAt *time.Time      `json:"finished_at"`
	// Logs (from logs_from) and the log's full size, in the detail view.
	Logs     *string `json:"logs,omitempty"`
	LogsSize *int    `json:"logs_size,omitempty"`
}

func toBuild(b store.Build) buildJSON {
	return buildJSON{ID: b.ID, TeamID: b.TeamID, Platform: b.Platform, Name: b.Name, Status: b.Status, Recipe: b.Recipe,
		SandboxID: b.SandboxID, Error: b.Error, CreatedAt: b.CreatedAt, StartedAt: b.StartedAt, FinishedAt: b.FinishedAt}
}

func (s *Server) createBuild(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.submitBuild(w, r, p, false)
}

func (s *Server) adminCreateBuild(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	return s.submitBuild(w, r, p, true)
}

// submitBuild validates a recipe and queues it; a platform build makes a
// template every team can use.
func (s *Server) submitBuild(w http.ResponseWriter, r *http.Request, p *principal, platform bool) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxJSONBody))
	if err != nil {
		return errf(http.StatusRequestEntityTooLarge, "body_too_large", "the recipe is larger than %d bytes", maxJSONBody)
	}
	rc, err := recipe.Parse(body)
	if err != nil {
		return badRequest("%s", err.Error())
	}
	ctx := r.Context()
	lookupTeam := p.TeamID
	if platform {
		lookupTeam = "" // a platform build's name must be free among platform templates
	}
	if _, err := s.st.TemplateByName(ctx, lookupTeam, rc.Name); err == nil {
		return conflict("a template named %q already exists", rc.Name)
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if busy, err := s.st.ActiveBuildNamed(ctx, p.TeamID, platform, rc.Name); err != nil {
		return err
	} else if busy {
		return conflict("a build of %q is already queued or running", rc.Name)
	}
	if _, err := s.st.TemplateByName(ctx, p.TeamID, rc.BaseTemplate); errors.Is(err, store.ErrNotFound) {
		return badRequest("base_template %q does not exist", rc.BaseTemplate)
	}
	normalized, _ := json.Marshal(rc)
	actor, _ := p.actor()
	b, err := s.st.InsertBuild(ctx, store.Build{ID: ids.New("bld"), TeamID: p.TeamID, Platform: platform, Name: rc.Name, Recipe: normalized, CreatedBy: &actor})
	s.audit(ctx, p, p.TeamID, "build", b.ID, "template.build", err, map[string]any{"name": rc.Name, "platform": platform})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, toBuild(b))
	return nil
}

func (s *Server) listBuilds(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.writeBuilds(w, r, p.TeamID)
}

func (s *Server) adminListBuilds(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	return s.writeBuilds(w, r, "")
}

func (s *Server) writeBuilds(w http.ResponseWriter, r *http.Request, teamID string) error {
	bs, err := s.st.Builds(r.Context(), teamID, 200)
	if err != nil {
		return err
	}
	out := make([]buildJSON, 0, len(bs))
	for _, b := range bs {
		out = append(out, toBuild(b))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getBuild(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.writeBuild(w, r, p.TeamID)
}

func (s *Server) adminGetBuild(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	return s.writeBuild(w, r, "")
}

// writeBuild answers a build with its log from ?logs_from= (a byte offset,
// so a client following a build asks only for what is new).
func (s *Server) writeBuild(w http.ResponseWriter, r *http.Request, teamID string) error {
	from := 0
	if v := r.URL.Query().Get("logs_from"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return badRequest("logs_from must be a byte offset")
		}
		from = n
	}
	b, err := s.build(r, teamID)
	if err != nil {
		return err
	}
	out := toBuild(b)
	logs, size := "", len(b.Logs)
	if from < size {
		logs = b.Logs[from:]
	}
	out.Logs, out.LogsSize = &logs, &size
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) build(r *http.Request, teamID string) (store.Build, error) {
	id := r.PathValue("id")
	if !ids.Valid("bld", id) {
		return store.Build{}, notFound("build")
	}
	b, err := s.st.Build(r.Context(), teamID, id)
	if errors.Is(err, store.ErrNotFound) {
		return b, notFound("build")
	}
	return b, err
}

func (s *Server) cancelBuild(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.stopBuild(w, r, p, p.TeamID)
}

func (s *Server) adminCancelBuild(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	return s.stopBuild(w, r, p, "")
}

func (s *Server) stopBuild(w http.ResponseWriter, r *http.Request, p *principal, teamID string) error {
	b, err := s.build(r, teamID)
	if err != nil {
		return err
	}
	if b.Status != "queued" && b.Status != "running" {
		return conflict("build %s is already %s", b.ID, b.Status)
	}
	_, err = s.st.CancelBuild(r.Context(), teamID, b.ID)
	s.audit(r.Context(), p, b.TeamID, "build", b.ID, "template.build_cancel", err, nil)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
