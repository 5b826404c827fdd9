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
	// Steps is the per-step log (a JSON array), CurrentStep the last step
	// begun of TotalSteps.
	Steps       json.RawMessage   `db:"steps"`
	CurrentStep int32             `db:"current_step"`
	TotalSteps  int32             `db:"total_steps"`
	DefaultUser string            `db:"default_user"`
	DefaultEnv  map[string]string `db:"default_env"`
}

const buildCols = `id, team_id, platform, name, recipe, status, cancel, sandbox_id, template_id, logs, error, created_by,
	created_at, started_at, finished_at, updated_at, steps, current_step, total_steps, default_user, default_env`

// MaxArchive bounds a build's uploaded archive, as upstream's.
const MaxArchive = 100 << 20

// MaxBuildLog bounds a build's stored log; later output is dropped with a note.
const MaxBuildLog = 1 << 20

// InsertBuild queues a build, with the archive its COPY steps read (nil:
// none) in the same transaction, so no replica claims it without.
func (s *Store) InsertBuild(ctx context.Context, b Build, archiveName string, archive []byte) (Build, error) {
	var out Build
	err := pgx.BeginFunc(ctx, s.Pool, func(tx pgx.Tx) error {
		rows, _ := tx.Query(ctx, `INSERT INTO template_builds (id, team_id, platform, name, recipe, created_by, total_steps)
			VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING `+buildCols, b.ID, b.TeamID, b.Platform, b.Name, b.Recipe, b.CreatedBy, b.TotalSteps)
		var err error
		if out, err = pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Build]); err != nil || archive == nil {
			return err
		}
		_, err = tx.Exec(ctx, "INSERT INTO build_archives (build_id, filename, data) VALUES ($1, $2, $3)", b.ID, archiveName, archive)
		return err
	})
	return out, mapErr(err, "queue build")
}

// BuildArchive returns a build's uploaded archive (nil when it has none).
func (s *Store) BuildArchive(ctx context.Context, id string) ([]byte, error) {
	var data []byte
	err := s.Pool.QueryRow(ctx, "SELECT data FROM build_archives WHERE build_id = $1", id).Scan(&data)
	if err == pgx.ErrNoRows {
		return nil, nil
	}
	return data, mapErr(err, "build archive")
}

// SetBuildSteps records the per-step log and how far the build is.
func (s *Store) SetBuildSteps(ctx context.Context, id string, current, total int, steps json.RawMessage) error {
	_, err := s.Pool.Exec(ctx, "UPDATE template_builds SET steps = $2, current_step = $3, total_steps = $4, updated_at = now() WHERE id = $1",
		id, steps, current, total)
	return mapErr(err, "build steps")
}

// SetBuildDefaults records the user and variables the recipe left.
func (s *Store) SetBuildDefaults(ctx context.Context, id, user string, env map[string]string) error {
	if env == nil {
		env = map[string]string{}
	}
	_, err := s.Pool.Exec(ctx, "UPDATE template_builds SET default_user = $2, default_env = $3 WHERE id = $1", id, user, env)
	return mapErr(err, "build defaults")
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

// ActiveBuildNamed finds a pending or running build that will make the
// named template, so two builds cannot race for one name.
func (s *Store) ActiveBuildNamed(ctx context.Context, teamID string, platform bool, name string) (bool, error) {
	var n int
	err := s.Pool.QueryRow(ctx, `SELECT count(*) FROM template_builds WHERE name = $3 AND status IN ('pending', 'running')
		AND (($2 AND platform) OR (NOT $2 AND NOT platform AND team_id = $1))`, teamID, platform, name).Scan(&n)
	return n > 0, mapErr(err, "active builds")
}

// ClaimBuild takes the oldest pending build for this replica (nil when
// none); concurrent replicas never claim the same one.
func (s *Store) ClaimBuild(ctx context.Context) (*Build, error) {
	rows, _ := s.Pool.Query(ctx, `UPDATE template_builds SET status = 'running', started_at = now(), updated_at = now()
		WHERE id = (SELECT id FROM template_builds WHERE status = 'pending' ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1)
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

// FinishBuild ends a running build and drops its archive.
func (s *Store) FinishBuild(ctx context.Context, id, status, templateID, reason string) error {
	var tpl *string
	if templateID != "" {
		tpl = &templateID
	}
	_, err := s.Pool.Exec(ctx, `WITH gone AS (DELETE FROM build_archives WHERE build_id = $1)
		UPDATE template_builds SET status = $2, template_id = $3, error = $4, finished_at = now(), updated_at = now()
		WHERE id = $1 AND status IN ('pending', 'running')`, id, status, tpl, reason)
	return mapErr(err, "finish build")
}

// CancelBuild asks a build to stop: a pending one is cancelled at once, a
// running one at its next step. It reports the status after the call.
func (s *Store) CancelBuild(ctx context.Context, teamID, id string) (string, error) {
	var status string
	err := s.Pool.QueryRow(ctx, `WITH gone AS (DELETE FROM build_archives WHERE build_id = $1 AND EXISTS
			(SELECT 1 FROM template_builds WHERE id = $1 AND status = 'pending' AND ($2 = '' OR team_id = $2)))
		UPDATE template_builds SET cancel = true,
			status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
			finished_at = CASE WHEN status = 'pending' THEN now() ELSE finished_at END, updated_at = now()
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
