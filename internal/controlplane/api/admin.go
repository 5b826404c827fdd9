package api

import (
	"context"
	"errors"
	"maps"
	"net/http"
	"strconv"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// requireAdmin lets only platform admins through (checked against the
// database on every request, not only the token's claim).
func requireAdmin(p *principal) error {
	if p == nil || !p.IsAdmin {
		return forbidden("this needs a platform admin")
	}
	return nil
}

type adminUserJSON struct {
	ID          string    `json:"id"`
	Email       string    `json:"email"`
	Name        string    `json:"name"`
	IsAdmin     bool      `json:"is_admin"`
	Status      string    `json:"status"`
	CreatedAt   time.Time `json:"created_at"`
	TeamsJoined int64     `json:"teams_joined"`
	TeamsOwned  int64     `json:"teams_owned"`
}

// adminPerPage is upstream Wrenn's page size for its admin lists.
const adminPerPage = 100

// adminPage reads ?page= (1 on) and ?per_page= (1-100, default 100).
func adminPage(r *http.Request) (page, perPage int, err error) {
	page, perPage = 1, adminPerPage
	q := r.URL.Query()
	if v := q.Get("page"); v != "" {
		if page, err = strconv.Atoi(v); err != nil || page < 1 || page > 1_000_000 {
			return 0, 0, badRequest("page must be a number from 1")
		}
	}
	if v := q.Get("per_page"); v != "" {
		if perPage, err = strconv.Atoi(v); err != nil || perPage < 1 || perPage > adminPerPage {
			return 0, 0, badRequest("per_page must be from 1 to %d", adminPerPage)
		}
	}
	return page, perPage, nil
}

// writePage answers a page of an admin list as upstream's: the items
// under their name, with total, page, per_page and total_pages.
func writePage(w http.ResponseWriter, name string, items any, total int64, page, perPage int) {
	writeJSON(w, http.StatusOK, map[string]any{name: items, "total": total, "page": page, "per_page": perPage,
		"total_pages": (total + int64(perPage) - 1) / int64(perPage)})
}

// adminListUsers pages through every user with the teams they are in
// and own (GET /v1/admin/users?page=).
func (s *Server) adminListUsers(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	page, perPage, err := adminPage(r)
	if err != nil {
		return err
	}
	us, total, err := s.st.UsersPage(r.Context(), perPage, (page-1)*perPage)
	if err != nil {
		return err
	}
	out := make([]adminUserJSON, 0, len(us))
	for _, u := range us {
		out = append(out, adminUserJSON{ID: u.ID, Email: u.Email, Name: u.Name, IsAdmin: u.IsAdmin, Status: u.Status, CreatedAt: u.CreatedAt,
			TeamsJoined: u.TeamsJoined, TeamsOwned: u.TeamsOwned})
	}
	writePage(w, "users", out, total, page, perPage)
	return nil
}

// adminUser loads the path's user.
func (s *Server) adminUser(r *http.Request) (store.User, error) {
	id := r.PathValue("id")
	if !ids.Valid("usr", id) {
		return store.User{}, notFound("user")
	}
	u, err := s.st.UserByID(r.Context(), id)
	if errors.Is(err, store.ErrNotFound) {
		return u, notFound("user")
	}
	return u, err
}

func (s *Server) adminSetUserAdmin(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Admin *bool `json:"admin"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if err := requireAdmin(p); err != nil {
		return err
	}
	if req.Admin == nil {
		return badRequest("admin (true or false) is required")
	}
	u, err := s.adminUser(r)
	if err != nil {
		return err
	}
	err = s.st.SetAdmin(r.Context(), u.ID, *req.Admin)
	if errors.Is(err, store.ErrConflict) {
		return conflict("%s is the last platform admin", u.Email)
	}
	s.audit(r.Context(), p, "", "user", u.ID, "user.set_admin", err, map[string]any{"admin": *req.Admin})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) adminSetUserActive(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Active *bool `json:"active"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if err := requireAdmin(p); err != nil {
		return err
	}
	if req.Active == nil {
		return badRequest("active (true or false) is required")
	}
	u, err := s.adminUser(r)
	if err != nil {
		return err
	}
	if u.ID == p.UserID && !*req.Active {
		return conflict("you cannot deactivate your own account")
	}
	if u.Status == "deleted" {
		return errf(http.StatusConflict, "invalid_state", "this account was deleted by its user and is purged when its grace period ends")
	}
	status := "disabled"
	if *req.Active {
		status = "active"
	}
	err = s.st.SetUserStatus(r.Context(), u.ID, status)
	s.audit(r.Context(), p, "", "user", u.ID, "user.set_active", err, map[string]any{"active": *req.Active})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// adminListTeams pages through live teams with their counts and an
// owner (GET /v1/admin/teams?page=), under upstream's names and ours.
func (s *Server) adminListTeams(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	page, perPage, err := adminPage(r)
	if err != nil {
		return err
	}
	ts, total, err := s.st.TeamsPage(r.Context(), perPage, (page-1)*perPage)
	if err != nil {
		return err
	}
	out := make([]map[string]any, 0, len(ts))
	for _, t := range ts {
		out = append(out, map[string]any{"id": t.ID, "name": t.Name, "slug": t.Slug, "is_byoc": t.IsBYOC, "created_at": t.CreatedAt,
			"deleted_at": nil, "member_count": t.Members, "active_sandbox_count": t.LiveCapsules, "channel_count": t.Channels,
			"owner_name": t.OwnerName, "owner_email": t.OwnerEmail, "members": t.Members, "live_capsules": t.LiveCapsules})
	}
	writePage(w, "teams", out, total, page, perPage)
	return nil
}

// adminSetTeamBYOC lets a team run hosts of its own (PUT
// /v1/admin/teams/{id}/byoc {"enabled": bool}). Disabling it keeps the
// team's hosts registered but gives them no more capsules.
func (s *Server) adminSetTeamBYOC(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	id := r.PathValue("id")
	if !ids.Valid("team", id) {
		return notFound("team")
	}
	var req struct {
		Enabled *bool `json:"enabled"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Enabled == nil {
		return badRequest(`enabled (true or false) is required`)
	}
	err := s.st.SetTeamBYOC(r.Context(), id, *req.Enabled)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("team")
	}
	s.audit(r.Context(), p, id, "team", id, "team.set_byoc", err, map[string]any{"enabled": *req.Enabled})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// adminSetTeamLimits overrides the platform's quotas for one team: each
// field a number (0: no limit) or null (the platform default).
func (s *Server) adminSetTeamLimits(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	id := r.PathValue("id")
	if !ids.Valid("team", id) {
		return notFound("team")
	}
	var o store.QuotaOverride
	if err := decode(w, r, &o, false); err != nil {
		return err
	}
	for _, v := range []*int32{o.Capsules, o.VCPUs, o.MemoryMB, o.DiskMB} {
		if v != nil && *v < 0 {
			return badRequest("limits must be 0 (no limit), a positive number, or null (the platform default)")
		}
	}
	err := s.st.SetTeamQuota(r.Context(), id, o)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("team")
	}
	s.audit(r.Context(), p, id, "team", id, "team.set_limits", err, map[string]any{"limits": o})
	if err != nil {
		return err
	}
	return s.writeLimits(w, r, id)
}

// adminDeleteTeam destroys a team's capsules and deletes the team.
func (s *Server) adminDeleteTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	id := r.PathValue("id")
	if !ids.Valid("team", id) {
		return notFound("team")
	}
	if id == store.PlatformTeamID {
		return conflict("the platform team holds the platform capsules and cannot be deleted")
	}
	if _, err := s.st.Team(r.Context(), id); errors.Is(err, store.ErrNotFound) {
		return notFound("team")
	} else if err != nil {
		return err
	}
	if err := s.removeTeam(r.Context(), p, id, map[string]any{"by": "platform admin"}); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) adminListTemplates(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	ts, err := s.st.AllTemplates(r.Context())
	if err != nil {
		return err
	}
	out := make([]map[string]any, 0, len(ts))
	for _, t := range ts {
		out = append(out, map[string]any{"template": toTemplate(t), "team_id": t.TeamID, "host_id": t.HostID})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// adminDeleteTemplate deletes a platform template made on a host (a
// platform build); images shipped with every host are not the API's to delete.
func (s *Server) adminDeleteTemplate(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	name := r.PathValue("name")
	t, err := s.st.TemplateByName(r.Context(), "", name)
	if errors.Is(err, store.ErrNotFound) || (err == nil && t.TeamID != nil) {
		return notFound("platform template")
	}
	if err != nil {
		return err
	}
	if t.HostID == nil {
		return conflict("template %q ships with every host; remove it from the hosts' images instead", name)
	}
	if err := s.removePlatformTemplate(r.Context(), p, t, nil); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// removePlatformTemplate deletes a template every team can use: the
// record, then its files on the host; meta goes into the audit entry.
func (s *Server) removePlatformTemplate(ctx context.Context, p *principal, t store.Template, meta map[string]any) error {
	if _, err := s.st.DeletePlatformTemplate(ctx, t.Name); err != nil {
		return err
	}
	s.removeTemplateFiles(ctx, t)
	entry := map[string]any{"name": t.Name}
	maps.Copy(entry, meta)
	s.audit(ctx, p, "", "template", t.ID, "template.delete", nil, entry)
	return nil
}

func (s *Server) adminListAuditLogs(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	return s.writeAudit(w, r, "")
}
