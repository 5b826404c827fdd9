package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// AuditEntry is one state-changing action: who, what, when, result.
type AuditEntry struct {
	ID           string         `db:"id"`
	TeamID       *string        `db:"team_id"`
	ActorType    string         `db:"actor_type"`
	ActorID      string         `db:"actor_id"`
	ActorName    string         `db:"actor_name"`
	ResourceType string         `db:"resource_type"`
	ResourceID   string         `db:"resource_id"`
	Action       string         `db:"action"`
	Status       string         `db:"status"`
	Metadata     map[string]any `db:"metadata"`
	CreatedAt    time.Time      `db:"created_at"`
}

const auditCols = "id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, status, metadata, created_at"

// Audit appends an entry.
func (s *Store) Audit(ctx context.Context, e AuditEntry) error {
	if e.Metadata == nil {
		e.Metadata = map[string]any{}
	}
	_, err := s.Pool.Exec(ctx, `INSERT INTO audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, status, metadata)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		e.ID, e.TeamID, e.ActorType, e.ActorID, e.ActorName, e.ResourceType, e.ResourceID, e.Action, e.Status, e.Metadata)
	return mapErr(err, "audit")
}

// AuditPage lists entries newest first, as q says.
func (s *Store) AuditPage(ctx context.Context, q AuditQuery) ([]AuditEntry, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+auditCols+` FROM audit_logs
		WHERE ($1 = '' OR team_id = $1) AND (created_at, id) < ($2, $3)
		AND (cardinality($5::text[]) = 0 OR resource_type = ANY($5))
		AND (cardinality($6::text[]) = 0 OR action = ANY($6))
		ORDER BY created_at DESC, id DESC LIMIT $4`, q.TeamID, q.Before, q.BeforeID, q.Limit, nonNil(q.ResourceTypes), nonNil(q.Actions))
	es, err := pgx.CollectRows(rows, pgx.RowToStructByName[AuditEntry])
	return es, mapErr(err, "audit page")
}

// AuditQuery is one page of an audit log: a team's ("" every team's),
// older than the cursor (Before, BeforeID), of any of the resource types
// and actions given (none: all).
type AuditQuery struct {
	TeamID        string
	Before        time.Time
	BeforeID      string
	Limit         int
	ResourceTypes []string
	Actions       []string
}

func nonNil(v []string) []string {
	if v == nil {
		return []string{}
	}
	return v
}
