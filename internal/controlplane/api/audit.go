package api

import (
	"context"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// audit records a state-changing action; a failure to record is logged,
// never returned to the caller whose action already happened.
func (s *Server) audit(ctx context.Context, p *principal, teamID, resourceType, resourceID, action string, err error, meta map[string]any) {
	typ, id := p.actor()
	e := store.AuditEntry{ID: ids.New("aud"), ActorType: typ, ActorID: id, ResourceType: resourceType, ResourceID: resourceID,
		Action: action, Status: "success", Metadata: meta}
	if p != nil {
		e.ActorName = p.Email
		if e.ActorName == "" {
			e.ActorName = p.Name
		}
	}
	if teamID != "" {
		e.TeamID = &teamID
	}
	if err != nil {
		e.Status = "failure"
		if e.Metadata == nil {
			e.Metadata = map[string]any{}
		}
		e.Metadata["error"] = err.Error()
	}
	if aerr := s.st.Audit(context.WithoutCancel(ctx), e); aerr != nil {
		s.log.Error("audit log write failed", "action", action, "resource", resourceID, "err", aerr)
	}
}

type auditJSON struct {
	ID           string         `json:"id"`
	TeamID       *string        `json:"team_id"`
	ActorType    string         `json:"actor_type"`
	ActorID      string         `json:"actor_id"`
	ActorName    string         `json:"actor_name"`
	ResourceType string         `json:"resource_type"`
	ResourceID   string         `json:"resource_id"`
	Action       string         `json:"action"`
	Scope        string         `json:"scope"`
	Status       string         `json:"status"`
	Metadata     map[string]any `json:"metadata"`
	CreatedAt    time.Time      `json:"created_at"`
}

func (s *Server) listAuditLogs(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.writeAudit(w, r, p.TeamID)
}

// writeAudit pages a team's audit log ("" every team's, for admins).
func (s *Server) writeAudit(w http.ResponseWriter, r *http.Request, teamID string) error {
	q := r.URL.Query()
	limit := 50
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 200 {
			return badRequest("limit must be between 1 and 200")
		}
		limit = n
	}
	before := time.Now().Add(time.Hour)
	if v := q.Get("before"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return badRequest("before must be an RFC 3339 time")
		}
		before = t
	}
	beforeID := q.Get("before_id")
	if q.Get("before") != "" && beforeID == "" {
		beforeID = "\uffff" // everything at exactly that time is before the cursor
	}
	entries, err := s.st.AuditPage(r.Context(), store.AuditQuery{TeamID: teamID, Before: before, BeforeID: beforeID, Limit: limit,
		ResourceTypes: listParam(q["resource_type"]), Actions: listParam(q["action"])})
	if err != nil {
		return err
	}
	scope := "team"
	if teamID == "" {
		scope = "platform"
	}
	out := make([]auditJSON, 0, len(entries))
	for _, e := range entries {
		out = append(out, auditJSON{ID: e.ID, TeamID: e.TeamID, ActorType: e.ActorType, ActorID: e.ActorID, ActorName: e.ActorName,
			ResourceType: e.ResourceType, ResourceID: e.ResourceID, Action: e.Action, Scope: scope, Status: e.Status,
			Metadata: e.Metadata, CreatedAt: e.CreatedAt})
	}
	// Upstream Wrenn's page: the items and, when there may be more, the
	// cursor to pass back as before and before_id.
	page := map[string]any{"items": out}
	if len(entries) == limit {
		last := entries[len(entries)-1]
		page["next_before"], page["next_before_id"] = last.CreatedAt.Format(time.RFC3339Nano), last.ID
	}
	writeJSON(w, http.StatusOK, page)
	return nil
}

// listParam reads a filter given as repeated parameters, comma-separated
// values or both, as upstream Wrenn does.
func listParam(values []string) []string {
	var out []string
	for _, v := range values {
		for _, part := range strings.Split(v, ",") {
			if part = strings.TrimSpace(part); part != "" && !slices.Contains(out, part) {
				out = append(out, part)
			}
		}
	}
	return out
}
