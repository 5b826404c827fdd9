package api

import (
	"context"
	"errors"
	"maps"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

type apiKeyJSON struct {
	ID           string     `json:"id"`
	TeamID       string     `json:"team_id"`
	Name         string     `json:"name"`
	KeyPrefix    string     `json:"key_prefix"`
	CreatedBy    *string    `json:"created_by"`
	CreatorEmail *string    `json:"creator_email"`
	Active       bool       `json:"active"` // false while its creator is deactivated
	CreatedAt    time.Time  `json:"created_at"`
	LastUsed     *time.Time `json:"last_used"`
	Key          *string    `json:"key,omitempty"`
}

func toAPIKey(k store.APIKey) apiKeyJSON {
	return apiKeyJSON{ID: k.ID, TeamID: k.TeamID, Name: k.Name, KeyPrefix: k.KeyPrefix, CreatedBy: k.CreatedBy, CreatorEmail: k.CreatorEmail,
		Active: k.CreatorActive, CreatedAt: k.CreatedAt, LastUsed: k.LastUsed}
}

func (s *Server) listAPIKeys(w http.ResponseWriter, r *http.Request, p *principal) error {
	keys, err := s.st.APIKeys(r.Context(), p.TeamID)
	if err != nil {
		return err
	}
	out := make([]apiKeyJSON, 0, len(keys))
	for _, k := range keys {
		out = append(out, toAPIKey(k))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) createAPIKey(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name string `json:"name"`
		// Format "e2b" makes a key in E2B's format (e2b_ + 40 hex), for
		// E2B's SDKs; "wrenn" (the default) a wrn_ key. Both work everywhere.
		Format string `json:"format"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	newKey := auth.NewAPIKey
	switch req.Format {
	case "", "wrenn":
	case "e2b":
		newKey = auth.NewE2BAPIKey
	default:
		return badRequest("format must be wrenn or e2b")
	}
	req.Name = strings.TrimSpace(req.Name)
	if req.Name == "" {
		req.Name = "Unnamed API Key"
	}
	if err := checkName(req.Name, 100, "name"); err != nil {
		return err
	}
	key, display, hash := newKey()
	k, err := s.st.CreateAPIKey(r.Context(), store.APIKey{ID: ids.New("key"), TeamID: p.TeamID, Name: req.Name, KeyPrefix: display, CreatedBy: &p.UserID}, hash)
	s.audit(r.Context(), p, p.TeamID, "api_key", k.ID, "api_key.create", err, map[string]any{"name": req.Name})
	if err != nil {
		return err
	}
	out := toAPIKey(k)
	out.Key = &key
	writeJSON(w, http.StatusCreated, out)
	return nil
}

// deleteAPIKey revokes a key: its creator, or the team's owners and admins.
func (s *Server) deleteAPIKey(w http.ResponseWriter, r *http.Request, p *principal) error {
	id := r.PathValue("id")
	k, err := s.st.APIKey(r.Context(), p.TeamID, id)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("API key")
	}
	if err != nil {
		return err
	}
	if (k.CreatedBy == nil || *k.CreatedBy != p.UserID) && p.Role != "owner" && p.Role != "admin" {
		return forbidden("only the key's creator and the team's owners and admins may revoke it")
	}
	err = s.st.DeleteAPIKey(r.Context(), p.TeamID, id)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("API key")
	}
	s.audit(r.Context(), p, p.TeamID, "api_key", id, "api_key.revoke", err, nil)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

var teamNameRE = regexp.MustCompile(`^[A-Za-z0-9 _'.-]{1,128}$`)

type teamJSON struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Slug      string    `json:"slug"`
	IsBYOC    bool      `json:"is_byoc"`
	CreatedAt time.Time `json:"created_at"`
	Role      string    `json:"role,omitempty"`
}

func toTeam(t store.Team, role string) teamJSON {
	return teamJSON{ID: t.ID, Name: t.Name, Slug: t.Slug, IsBYOC: t.IsBYOC, CreatedAt: t.CreatedAt, Role: role}
}

func (s *Server) listTeams(w http.ResponseWriter, r *http.Request, p *principal) error {
	teams, err := s.st.TeamsForUser(r.Context(), p.UserID)
	if err != nil {
		return err
	}
	out := make([]teamJSON, 0, len(teams))
	for _, t := range teams {
		out = append(out, toTeam(t.Team, t.Role))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) createTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	req.Name = strings.TrimSpace(req.Name)
	if !teamNameRE.MatchString(req.Name) {
		return badRequest("name must be 1-128 characters: letters, digits, space, _ ' . -")
	}
	t := store.Team{ID: ids.New("team"), Name: req.Name, Slug: newSlug()}
	err := s.st.CreateTeam(r.Context(), t, p.UserID)
	s.audit(r.Context(), p, t.ID, "team", t.ID, "team.create", err, map[string]any{"name": req.Name})
	if err != nil {
		return err
	}
	created, err := s.st.Team(r.Context(), t.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, toTeam(created, "owner"))
	return nil
}

// teamFor checks that the path's team is the token's team (other teams
// are answered like missing ones) and, if roles are given, the caller's role.
func teamFor(r *http.Request, p *principal, roles ...string) error {
	if r.PathValue("id") != p.TeamID {
		return notFound("team")
	}
	if len(roles) == 0 {
		return nil
	}
	for _, role := range roles {
		if p.Role == role {
			return nil
		}
	}
	return forbidden("this needs the %s role in the team", strings.Join(roles, " or "))
}

type memberJSON struct {
	UserID   string    `json:"user_id"`
	Email    string    `json:"email"`
	Name     string    `json:"name"`
	Role     string    `json:"role"`
	JoinedAt time.Time `json:"joined_at"`
}

func (s *Server) members(r *http.Request, teamID string) ([]memberJSON, error) {
	ms, err := s.st.Members(r.Context(), teamID)
	if err != nil {
		return nil, err
	}
	out := make([]memberJSON, 0, len(ms))
	for _, m := range ms {
		out = append(out, memberJSON{UserID: m.UserID, Email: m.Email, Name: m.Name, Role: m.Role, JoinedAt: m.JoinedAt})
	}
	return out, nil
}

func (s *Server) getTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p); err != nil {
		return err
	}
	t, err := s.st.Team(r.Context(), p.TeamID)
	if err != nil {
		return err
	}
	ms, err := s.members(r, t.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"team": toTeam(t, ""), "members": ms})
	return nil
}

func (s *Server) renameTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p, "owner", "admin"); err != nil {
		return err
	}
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	req.Name = strings.TrimSpace(req.Name)
	if !teamNameRE.MatchString(req.Name) {
		return badRequest("name must be 1-128 characters: letters, digits, space, _ ' . -")
	}
	err := s.st.RenameTeam(r.Context(), p.TeamID, req.Name)
	s.audit(r.Context(), p, p.TeamID, "team", p.TeamID, "team.rename", err, map[string]any{"name": req.Name})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) deleteTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p, "owner"); err != nil {
		return err
	}
	if err := s.removeTeam(r.Context(), p, p.TeamID, nil); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// removeTeam destroys a team's live capsules and marks it deleted; meta
// goes into the audit entry beside the number of capsules destroyed.
func (s *Server) removeTeam(ctx context.Context, p *principal, teamID string, meta map[string]any) error {
	live, err := s.st.Sandboxes(ctx, store.SandboxFilter{TeamID: teamID, Statuses: store.Live})
	if err != nil {
		return err
	}
	for _, sb := range live {
		if err := s.destroyOnHost(ctx, sb); err != nil {
			return err
		}
	}
	err = s.st.DeleteTeam(ctx, teamID)
	entry := map[string]any{"capsules_destroyed": len(live)}
	maps.Copy(entry, meta)
	s.audit(ctx, p, teamID, "team", teamID, "team.delete", err, entry)
	return err
}

func (s *Server) listMembers(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p); err != nil {
		return err
	}
	ms, err := s.members(r, p.TeamID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ms)
	return nil
}

func (s *Server) addMember(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p, "owner", "admin"); err != nil {
		return err
	}
	var req struct {
		Email string `json:"email"`
		Role  string `json:"role"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Role == "" {
		req.Role = "member"
	}
	if req.Role != "member" && req.Role != "admin" {
		return badRequest("role must be member or admin")
	}
	u, err := s.st.UserByEmail(r.Context(), strings.TrimSpace(req.Email))
	if errors.Is(err, store.ErrNotFound) {
		return notFound("account with that email")
	}
	if err != nil {
		return err
	}
	err = s.st.AddMember(r.Context(), p.TeamID, u.ID, req.Role)
	if errors.Is(err, store.ErrConflict) {
		return badRequest("that user is already a member")
	}
	s.audit(r.Context(), p, p.TeamID, "team_member", u.ID, "team.member_add", err, map[string]any{"role": req.Role})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, memberJSON{UserID: u.ID, Email: u.Email, Name: u.Name, Role: req.Role, JoinedAt: time.Now().UTC()})
	return nil
}

func (s *Server) updateMember(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p, "owner", "admin"); err != nil {
		return err
	}
	var req struct {
		Role string `json:"role"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Role != "member" && req.Role != "admin" {
		return badRequest("role must be member or admin")
	}
	uid := r.PathValue("uid")
	role, err := s.st.MemberRole(r.Context(), p.TeamID, uid)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("member")
	}
	if err != nil {
		return err
	}
	if role == "owner" {
		return forbidden("the owner's role cannot be changed")
	}
	err = s.st.SetMemberRole(r.Context(), p.TeamID, uid, req.Role)
	s.audit(r.Context(), p, p.TeamID, "team_member", uid, "team.member_role", err, map[string]any{"role": req.Role})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) removeMember(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p, "owner", "admin"); err != nil {
		return err
	}
	uid := r.PathValue("uid")
	role, err := s.st.MemberRole(r.Context(), p.TeamID, uid)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("member")
	}
	if err != nil {
		return err
	}
	if role == "owner" {
		return forbidden("the owner cannot be removed")
	}
	revoked, err := s.st.RemoveMember(r.Context(), p.TeamID, uid)
	s.audit(r.Context(), p, p.TeamID, "team_member", uid, "team.member_remove", err, map[string]any{"api_keys_revoked": revoked})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// teamLimits tells a team's members its quotas and what its capsules hold.
func (s *Server) teamLimits(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p); err != nil {
		return err
	}
	return s.writeLimits(w, r, p.TeamID)
}

func (s *Server) writeLimits(w http.ResponseWriter, r *http.Request, teamID string) error {
	override, limits, usage, err := s.st.TeamQuota(r.Context(), teamID, s.cfg.Quotas)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"team_id": teamID, "limits": limits, "overrides": override, "usage": usage})
	return nil
}

func (s *Server) leaveTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := teamFor(r, p); err != nil {
		return err
	}
	if p.Role == "owner" {
		return forbidden("the owner cannot leave; delete the team instead")
	}
	revoked, err := s.st.RemoveMember(r.Context(), p.TeamID, p.UserID)
	s.audit(r.Context(), p, p.TeamID, "team_member", p.UserID, "team.leave", err, map[string]any{"api_keys_revoked": revoked})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
