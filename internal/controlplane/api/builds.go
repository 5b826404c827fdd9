package api

import (
	"cmp"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"strconv"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/buildarchive"
	"github.com/wrenn/wrenn/internal/controlplane/builder"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/recipe"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// buildJSON is a build in upstream Wrenn's shape (recipe lines, a log
// entry per step under logs, step counters, the defaults the recipe left),
// with this project's fields beside it (team, platform, the full text
// output in the detail view).
type buildJSON struct {
	ID           string            `json:"id"`
	TeamID       string            `json:"team_id"`
	Platform     bool              `json:"platform"`
	Name         string            `json:"name"`
	BaseTemplate string            `json:"base_template"`
	Recipe       []string          `json:"recipe"`
	Healthcheck  *string           `json:"healthcheck,omitempty"`
	VCPUs        int               `json:"vcpus"`
	MemoryMB     int               `json:"memory_mb"`
	SkipPrePost  bool              `json:"skip_pre_post"`
	Status       string            `json:"status"`
	CurrentStep  int32             `json:"current_step"`
	TotalSteps   int32             `json:"total_steps"`
	Logs         json.RawMessage   `json:"logs"`
	Error        string            `json:"error,omitempty"`
	SandboxID    *string           `json:"sandbox_id,omitempty"`
	DefaultUser  string            `json:"default_user"`
	DefaultEnv   map[string]string `json:"default_env"`
	CreatedAt    time.Time         `json:"created_at"`
	StartedAt    *time.Time        `json:"started_at,omitempty"`
	CompletedAt  *time.Time        `json:"completed_at,omitempty"`
	// Output (from output_from) and its full size, in the detail view.
	Output     *string `json:"output,omitempty"`
	OutputSize *int    `json:"output_size,omitempty"`
}

func toBuild(b store.Build) buildJSON {
	out := buildJSON{ID: b.ID, TeamID: b.TeamID, Platform: b.Platform, Name: b.Name, Status: b.Status, CurrentStep: b.CurrentStep,
		TotalSteps: b.TotalSteps, Logs: b.Steps, Error: b.Error, SandboxID: b.SandboxID, DefaultUser: b.DefaultUser, DefaultEnv: b.DefaultEnv,
		CreatedAt: b.CreatedAt, StartedAt: b.StartedAt, CompletedAt: b.FinishedAt, Recipe: []string{}}
	if r, err := recipe.Parse(b.Recipe); err == nil {
		out.BaseTemplate, out.Recipe, out.VCPUs, out.MemoryMB, out.SkipPrePost = r.BaseTemplate, r.Lines, r.VCPUs, r.MemoryMB, !r.PrePost
		if r.HealthCheck != nil {
			out.Healthcheck = &r.HealthCheck.Text
		}
	}
	if len(out.Logs) == 0 {
		out.Logs = json.RawMessage("[]")
	}
	if out.DefaultEnv == nil {
		out.DefaultEnv = map[string]string{}
	}
	return out
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

// readBuildRequest reads a recipe as JSON, or as upstream's multipart form:
// the recipe as JSON in a "config" field and an optional "archive" file
// (tar, tar.gz or zip) that COPY steps read.
func readBuildRequest(w http.ResponseWriter, r *http.Request) (body, archive []byte, archiveName string, err error) {
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "multipart/form-data" {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxJSONBody))
		if err != nil {
			return nil, nil, "", errf(http.StatusRequestEntityTooLarge, "body_too_large", "the recipe is larger than %d bytes", maxJSONBody)
		}
		return body, nil, "", nil
	}
	r.Body = http.MaxBytesReader(w, r.Body, store.MaxArchive+maxJSONBody+64<<10)
	mr, err := r.MultipartReader()
	if err != nil {
		return nil, nil, "", badRequest("the multipart form cannot be read: %s", err.Error())
	}
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, nil, "", errf(http.StatusRequestEntityTooLarge, "payload_too_large", "the archive may be at most %d MiB", store.MaxArchive>>20)
		}
		if err != nil {
			return nil, nil, "", badRequest("the multipart form cannot be read: %s", err.Error())
		}
		switch part.FormName() {
		case "config":
			if body, err = io.ReadAll(io.LimitReader(part, maxJSONBody+1)); err != nil || len(body) > maxJSONBody {
				return nil, nil, "", badRequest("config must be the recipe as JSON, at most %d bytes", maxJSONBody)
			}
		case "archive":
			archiveName = part.FileName()
			archive, err = io.ReadAll(io.LimitReader(part, store.MaxArchive+1))
			if errors.As(err, &mbe) || len(archive) > store.MaxArchive {
				return nil, nil, "", errf(http.StatusRequestEntityTooLarge, "payload_too_large", "the archive may be at most %d MiB", store.MaxArchive>>20)
			}
			if err != nil {
				return nil, nil, "", badRequest("the archive cannot be read: %s", err.Error())
			}
		}
		part.Close()
	}
	if body == nil {
		return nil, nil, "", badRequest("a multipart build needs a 'config' field holding the recipe as JSON")
	}
	return body, archive, archiveName, nil
}

// submitBuild validates a recipe and queues it; a platform build makes a
// template every team can use.
func (s *Server) submitBuild(w http.ResponseWriter, r *http.Request, p *principal, platform bool) error {
	body, archive, archiveName, err := readBuildRequest(w, r)
	if err != nil {
		return err
	}
	rc, err := recipe.Parse(body)
	if err != nil {
		return badRequest("%s", err.Error())
	}
	if archive != nil {
		if _, err := buildarchive.Check(archive); err != nil {
			return badRequest("%s", err.Error())
		}
	} else if rc.UsesArchive() {
		return badRequest("the recipe has COPY steps: send it as multipart/form-data with the recipe in 'config' and the files in 'archive' (tar, tar.gz or zip)")
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
		return conflict("a build of %q is already pending or running", rc.Name)
	}
	if _, err := s.st.TemplateByName(ctx, p.TeamID, rc.BaseTemplate); errors.Is(err, store.ErrNotFound) {
		return badRequest("base_template %q does not exist", rc.BaseTemplate)
	}
	total := len(rc.Steps)
	if rc.PrePost {
		total += len(builder.PreBuild()) + len(builder.PostBuild())
	}
	actor, _ := p.actor()
	b, err := s.st.InsertBuild(ctx, store.Build{ID: ids.New("bld"), TeamID: p.TeamID, Platform: platform, Name: rc.Name, Recipe: rc.Stored,
		CreatedBy: &actor, TotalSteps: int32(total)}, archiveName, archive)
	s.audit(ctx, p, p.TeamID, "build", b.ID, "template.build", err, map[string]any{"name": rc.Name, "platform": platform, "archive_bytes": len(archive)})
	if err != nil {
		return err
	}
	// Upstream's admin route answers 201; the team route keeps its 202.
	status := http.StatusAccepted
	if platform {
		status = http.StatusCreated
	}
	writeJSON(w, status, toBuild(b))
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

// writeBuild answers a build with its text output from ?output_from= (a
// byte offset, so a client following a build asks only for what is new;
// logs_from is the earlier name).
func (s *Server) writeBuild(w http.ResponseWriter, r *http.Request, teamID string) error {
	from := 0
	q := r.URL.Query()
	if v := cmp.Or(q.Get("output_from"), q.Get("logs_from")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return badRequest("output_from must be a byte offset")
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
	out.Output, out.OutputSize = &logs, &size
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
	if b.Status != "pending" && b.Status != "running" {
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
