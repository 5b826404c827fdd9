package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// Template is a base image (platform-wide) or a team's snapshot.
type Template struct {
	ID              string            `db:"id"`
	TeamID          *string           `db:"team_id"`
	Name            string            `db:"name"`
	Type            string            `db:"type"`
	VCPUs           *int32            `db:"vcpus"`
	MemoryMB        *int32            `db:"memory_mb"`
	SizeBytes       int64             `db:"size_bytes"`
	HostID          *string           `db:"host_id"`
	SourceSandboxID *string           `db:"source_sandbox_id"`
	Metadata        map[string]string `db:"metadata"`
	CreatedAt       time.Time         `db:"created_at"`
	// MemoryBytes is the size of the VM memory the template holds (0: disk only).
	MemoryBytes int64 `db:"memory_bytes"`
	// WarmPoolSize is how many ready sandboxes of it each host that has
	// it keeps; nil leaves it to the hosts' own settings.
	WarmPoolSize *int32 `db:"warm_pool_size"`
	// DefaultUser and DefaultEnv are what its build left: capsules from
	// it run /v1 calls as that user ("": root) and start with the variables.
	DefaultUser string            `db:"default_user"`
	DefaultEnv  map[string]string `db:"default_env"`
}

const templateCols = "id, team_id, name, type, vcpus, memory_mb, size_bytes, host_id, source_sandbox_id, metadata, created_at, memory_bytes, warm_pool_size, default_user, default_env"

// SetWarmPoolSize sets (nil: clears) a template's warm pool size.
func (s *Store) SetWarmPoolSize(ctx context.Context, id string, size *int32) error {
	tag, err := s.Pool.Exec(ctx, "UPDATE templates SET warm_pool_size = $2 WHERE id = $1", id, size)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return mapErr(err, "set warm pool size")
}

// WarmPoolTemplates are the templates with a warm pool size set.
func (s *Store) WarmPoolTemplates(ctx context.Context) ([]Template, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+templateCols+" FROM templates WHERE warm_pool_size IS NOT NULL ORDER BY id")
	ts, err := pgx.CollectRows(rows, pgx.RowToStructByName[Template])
	return ts, mapErr(err, "warm pool templates")
}

// Templates lists the platform's templates and a team's own; typ filters.
func (s *Store) Templates(ctx context.Context, teamID, typ string) ([]Template, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+templateCols+` FROM templates
		WHERE (team_id IS NULL OR team_id = $1) AND ($2 = '' OR type = $2) ORDER BY team_id NULLS FIRST, created_at, name`, teamID, typ)
	ts, err := pgx.CollectRows(rows, pgx.RowToStructByName[Template])
	return ts, mapErr(err, "list templates")
}

// TemplateByName finds a template a team may use: its own first, then
// the platform's.
func (s *Store) TemplateByName(ctx context.Context, teamID, name string) (Template, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+templateCols+` FROM templates
		WHERE name = $2 AND (team_id = $1 OR team_id IS NULL) ORDER BY team_id NULLS LAST LIMIT 1`, teamID, name)
	t, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Template])
	return t, mapErr(err, "template")
}

// InsertTemplate records a team's snapshot template.
func (s *Store) InsertTemplate(ctx context.Context, t Template) (Template, error) {
	if t.Metadata == nil {
		t.Metadata = map[string]string{}
	}
	if t.DefaultEnv == nil {
		t.DefaultEnv = map[string]string{}
	}
	err := s.Pool.QueryRow(ctx, `INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb, size_bytes, host_id, source_sandbox_id, metadata, memory_bytes,
			default_user, default_env)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING created_at`,
		t.ID, t.TeamID, t.Name, t.Type, t.VCPUs, t.MemoryMB, t.SizeBytes, t.HostID, t.SourceSandboxID, t.Metadata, t.MemoryBytes,
		t.DefaultUser, t.DefaultEnv).Scan(&t.CreatedAt)
	return t, mapErr(err, "insert template")
}

// DeleteTemplate removes one of a team's templates.
func (s *Store) DeleteTemplate(ctx context.Context, teamID, name string) (Template, error) {
	rows, _ := s.Pool.Query(ctx, "DELETE FROM templates WHERE team_id = $1 AND name = $2 RETURNING "+templateCols, teamID, name)
	t, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Template])
	return t, mapErr(err, "delete template")
}
