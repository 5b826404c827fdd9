package api

import (
	"net/http"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// E2B's snapshots and forks, on the control plane's snapshot templates
// and fork. A snapshot's ID is its template's name (names are unique in a
// team), so Sandbox.create(snapshotID) finds it as a template.

type e2bSnapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

func e2bSnapshotOf(t store.Template) e2bSnapshotInfo {
	return e2bSnapshotInfo{SnapshotID: t.Name, Names: []string{t.Name}}
}

// e2bCreateSnapshot is POST /sandboxes/{sandboxID}/snapshots: a snapshot
// template of the sandbox's memory and disk (it keeps running); a name
// that is already one of the team's snapshots gets the new state, as
// E2B's "new build" of it.
func (s *Server) e2bCreateSnapshot(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	name, _, _ := strings.Cut(req.Name, ":") // a tag: snapshots here have one version
	if _, err := s.e2bCapsule(r, p); err != nil {
		return err
	}
	// Only a snapshot gives way to a new one of its name: a built template
	// (or a platform one) is never replaced by a snapshot.
	if t, err := s.st.TemplateByName(r.Context(), p.TeamID, name); err == nil && t.Type != "snapshot" {
		return conflict("template %q exists and is not a snapshot: choose another name", name)
	}
	t, err := s.snapshotCapsule(r, p, r.PathValue("sandboxID"), name, false, true)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, e2bSnapshotOf(t))
	return nil
}

// e2bListSnapshots is GET /snapshots: the team's snapshots, filtered by
// source sandbox and name.
func (s *Server) e2bListSnapshots(w http.ResponseWriter, r *http.Request, p *principal) error {
	q := r.URL.Query()
	ts, err := s.st.Templates(r.Context(), p.TeamID, "snapshot")
	if err != nil {
		return err
	}
	name, _, _ := strings.Cut(q.Get("name"), ":")
	out := []e2bSnapshotInfo{}
	for _, t := range ts {
		switch {
		case t.TeamID == nil || *t.TeamID != p.TeamID:
		case q.Get("sandboxID") != "" && (t.SourceSandboxID == nil || *t.SourceSandboxID != q.Get("sandboxID")):
		case name != "" && t.Name != name:
		default:
			out = append(out, e2bSnapshotOf(t))
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// e2bDeleteTemplate is DELETE /templates/{templateID}: one of the team's
// own templates (its snapshots); 404 for anything else.
func (s *Server) e2bDeleteTemplate(w http.ResponseWriter, r *http.Request, p *principal) error {
	name, _, _ := strings.Cut(r.PathValue("templateID"), ":")
	r.SetPathValue("name", name)
	return s.deleteSnapshot(w, r, p)
}

// e2bForkResult is one fork's outcome: the sandbox, or why it did not start.
type e2bForkResult struct {
	Sandbox *e2bSandbox `json:"sandbox,omitempty"`
	Error   *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

// e2bFork is POST /sandboxes/{sandboxID}/fork {timeout, count}: count
// sandboxes with the sandbox's memory and disk as they are now (it pauses
// only for the copy), each living timeout seconds (default 15, as E2B).
func (s *Server) e2bFork(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Timeout *int `json:"timeout"`
		Count   *int `json:"count"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	count, timeout := 1, 15
	if req.Count != nil {
		count = *req.Count
	}
	if req.Timeout != nil {
		timeout = *req.Timeout
	}
	if count < 1 || count > maxFork {
		return badRequest("count must be between 1 and %d", maxFork)
	}
	if timeout < 0 || timeout > maxTimeoutSec {
		return badRequest("timeout must be between 0 and %d seconds", maxTimeoutSec)
	}
	if _, err := s.e2bCapsule(r, p); err != nil {
		return err
	}
	r.SetPathValue("id", r.PathValue("sandboxID"))
	src, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	end := time.Now().Add(time.Duration(timeout) * time.Second).UTC()
	children, err := s.forkInto(r.Context(), p, src, c, count, &end)
	if err != nil {
		return err
	}
	out := make([]e2bForkResult, 0, len(children))
	for _, child := range children {
		sb, err := s.e2bSandboxOf(r.Context(), child)
		if err != nil {
			return err
		}
		out = append(out, e2bForkResult{Sandbox: &sb})
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}
