package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// TeamSummary is a team as platform admins list it.
type TeamSummary struct {
	ID           string    `db:"id"`
	Name         string    `db:"name"`
	Slug         string    `db:"slug"`
	IsBYOC       bool      `db:"is_byoc"`
	CreatedAt    time.Time `db:"created_at"`
	Members      int64     `db:"members"`
	LiveCapsules int64     `db:"live_capsules"`
}

// AllTeams lists every live team with its member and live capsule counts.
func (s *Store) AllTeams(ctx context.Context) ([]TeamSummary, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT t.id, t.name, t.slug, t.is_byoc, t.created_at,
			(SELECT count(*) FROM team_members m WHERE m.team_id = t.id) AS members,
			(SELECT count(*) FROM sandboxes sb WHERE sb.team_id = t.id AND sb.status = ANY($1)) AS live_capsules
		FROM teams t WHERE t.deleted_at IS NULL ORDER BY t.created_at, t.id`, Live)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[TeamSummary])
	return out, mapErr(err, "all teams")
}

// AllTemplates lists every template of every team and the platform.
func (s *Store) AllTemplates(ctx context.Context) ([]Template, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+templateCols+" FROM templates ORDER BY team_id NULLS FIRST, created_at, name")
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[Template])
	return out, mapErr(err, "all templates")
}

// DeletePlatformTemplate removes a platform template's record.
func (s *Store) DeletePlatformTemplate(ctx context.Context, name string) (Template, error) {
	rows, _ := s.Pool.Query(ctx, "DELETE FROM templates WHERE team_id IS NULL AND name = $1 RETURNING "+templateCols, name)
	t, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Template])
	return t, mapErr(err, "delete platform template")
}
