package store

import (
	"context"
	"encoding/json"
	"time"

	"github.com/jackc/pgx/v5"
)

// Build is a template build.
type Build struct {
	ID         string          `db:"id"`
	TeamID     string          `db:"team_id"`
	Platform   bool            `db:"platform"`
	Name       string          `db:"name"`
	Recipe     json.RawMessage `db:"recipe"`
	Status     string          `db:"status"`
	Cancel     bool            `db:"cancel"`
	SandboxID  *string         `db:"sandbox_id"`
	TemplateID *string         `db:"template_id"`
	Logs       string          `db:"logs"`
	Error      string          `db:"error"`
	CreatedBy  *string         `db:"created_by"`
	CreatedAt  time.Time       `db:"created_at"`
	StartedAt  *time.Time      `db:"started_at"`
	FinishedAt *time.Time      `db:"finished_at"`
	UpdatedAt  time.Time       `db:"updated_at"`
}

const buildCols = `id, team_id, platform, name, recipe, status, cancel, sandbox_id, template_id, logs, error, created_by,
	created_at, started_at, finished_at, updated_at`

// MaxBuildLog bounds a build's stored log; later output is dropped with a note.
const MaxBuildLog = 1 << 20

// InsertBuild queues a build.
func (s *Store) InsertBuild(ctx context.Context, b Build) (Build, error) {
	rows, _ := s.Pool.Query(ctx, `INSERT INTO template_builds (id, team_id, platform, name, recipe, created_by)
		VALUES ($1, $2, $3, $4, $5, $6) RETURNING `+buildCols, b.ID, b.TeamID, b.Platform, b.Name, b.Recipe, b.CreatedBy)
	out, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Build])
	return out, mapErr(err, "queue build")
}

// Builds lists a team's builds (or, for "", every team's), newest first.
func (s *Store) Builds(ctx context.Context, teamID string, limit int) ([]Build, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+buildCols+` FROM template_builds WHERE ($1 = '' OR team_id = $1)
		ORDER BY created_at DESC, id LIMIT $2`, teamID, limit)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[Build])
	return out, mapErr(err, "builds")
}

// Build returns one build; another team's is ErrNotFound ("" matches any).
func (s *Store) Build(ctx context.Context, teamID, id string) (Build, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+buildCols+" FROM template_builds WHERE id = $1 AND ($2 = '' OR team_id = $2)", id, teamID)
	out, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Build])
	return out, mapErr(err, "build")
}

// ActiveBuildNamed finds a queued or running build that will make the
// named template, so two builds cannot race for one name.
func (s *Store) ActiveBuildNamed(ctx context.Context, teamID string, platform bool, name string) (bool, error) {
	var n int
	err := s.Pool.QueryRow(ctx, `SELECT count(*) FROM template_builds WHERE name = $3 AND status IN ('queued', 'running')
		AND (($2 AND platform) OR (NOT $2 AND NOT platform AND team_id = $1))`, teamID, platform, name).Scan(&n)
	return n > 0, mapErr(err, "active builds")
}

// ClaimBuild takes the oldest queued build for this replica (nil when
// none); concurrent replicas never claim the same one.
func (s *Store) ClaimBuild(ctx context.Context) (*Build, error) {
	rows, _ := s.Pool.Query(ctx, `UPDATE template_builds SET status = 'running', started_at = now(), updated_at = now()
		WHERE id = (SELECT id FROM template_builds WHERE status = 'queued' ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1)
		RETURNING `+buildCols)
	b, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Build])
	if err == pgx.ErrNoRows {
		return nil, nil
	}
	if err != nil {
		return nil, mapErr(err, "claim build")
	}
	return &b, nil
}

// AppendBuildLog adds output to a build's log (up to MaxBuildLog) and
// reports whether the build was asked to stop.
func (s *Store) AppendBuildLog(ctx context.Context, id, text string) (cancel bool, err error) {
	err = s.Pool.QueryRow(ctx, `UPDATE template_builds SET updated_at = now(), logs = CASE
			WHEN length(logs) >= $3 THEN logs
			WHEN length(logs) + length($2) > $3 THEN logs || left($2, $3 - length(logs)) || E'\n[log truncated]\n'
			ELSE logs || $2 END
		WHERE id = $1 RETURNING cancel`, id, text, MaxBuildLog).Scan(&cancel)
	return cancel, mapErr(err, "build log")
}

// SetBuildSandbox records the capsule a build runs in.
func (s *Store) SetBuildSandbox(ctx context.Context, id, sandboxID string) error {
	_, err := s.Pool.Exec(ctx, "UPDATE template_builds SET sandbox_id = $2, updated_at = now() WHERE id = $1", id, sandboxID)
	return mapErr(err, "build sandbox")
}

// FinishBuild ends a running build.
func (s *Store) FinishBuild(ctx context.Context, id, status, templateID, reason string) error {
	var tpl *string
	if templateID != "" {
		tpl = &templateID
	}
	_, err := s.Pool.Exec(ctx, `UPDATE template_builds SET status = $2, template_id = $3, error = $4, finished_at = now(), updated_at = now()
		WHERE id = $1 AND status IN ('queued', 'running')`, id, status, tpl, reason)
	return mapErr(err, "finish build")
}

// CancelBuild asks a build to stop: a queued one is cancelled at once, a
// running one at its next step. It reports the status after the call.
func (s *Store) CancelBuild(ctx context.Context, teamID, id string) (string, error) {
	var status string
	err := s.Pool.QueryRow(ctx, `UPDATE template_builds SET cancel = true,
			status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
			finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END, updated_at = now()
		WHERE id = $1 AND ($2 = '' OR team_id = $2) RETURNING status`, id, teamID).Scan(&status)
	return status, mapErr(err, "cancel build")
}

// StaleBuilds are running builds that have not logged for a while: the
// replica running them died.
func (s *Store) StaleBuilds(ctx context.Context, silence time.Duration) ([]Build, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+buildCols+` FROM template_builds
		WHERE status = 'running' AND updated_at < now() - $1::interval`, silence.String())
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[Build])
	return out, mapErr(err, "stale builds")
}
