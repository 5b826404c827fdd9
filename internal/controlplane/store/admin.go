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
	Channels     int64     `db:"channels"`
	// The owner who has been one longest ("" if the team has none left).
	OwnerName  string `db:"owner_name"`
	OwnerEmail string `db:"owner_email"`
}

// TeamsPage lists live teams, oldest first, with member, live capsule
// and channel counts and an owner, and how many teams there are.
func (s *Store) TeamsPage(ctx context.Context, limit, offset int) ([]TeamSummary, int64, error) {
	var total int64
	if err := s.Pool.QueryRow(ctx, "SELECT count(*) FROM teams WHERE deleted_at IS NULL").Scan(&total); err != nil {
		return nil, 0, mapErr(err, "count teams")
	}
	rows, _ := s.Pool.Query(ctx, `SELECT t.id, t.name, t.slug, t.is_byoc, t.created_at,
			(SELECT count(*) FROM team_members m WHERE m.team_id = t.id) AS members,
			(SELECT count(*) FROM sandboxes sb WHERE sb.team_id = t.id AND sb.status = ANY($1)) AS live_capsules,
			(SELECT count(*) FROM channels c WHERE c.team_id = t.id) AS channels,
			coalesce(o.name, '') AS owner_name, coalesce(o.email, '') AS owner_email
		FROM teams t LEFT JOIN LATERAL (SELECT u.name, u.email FROM team_members m JOIN users u ON u.id = m.user_id
			WHERE m.team_id = t.id AND m.role = 'owner' ORDER BY m.joined_at, u.id LIMIT 1) o ON true
		WHERE t.deleted_at IS NULL ORDER BY t.created_at, t.id LIMIT $2 OFFSET $3`, Live, limit, offset)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[TeamSummary])
	return out, total, mapErr(err, "teams page")
}

// UserSummary is a user with the number of teams they are in and own.
type UserSummary struct {
	ID          string    `db:"id"`
	Email       string    `db:"email"`
	Name        string    `db:"name"`
	IsAdmin     bool      `db:"is_admin"`
	Status      string    `db:"status"`
	CreatedAt   time.Time `db:"created_at"`
	TeamsJoined int64     `db:"teams_joined"`
	TeamsOwned  int64     `db:"teams_owned"`
}

// UsersPage lists users, oldest first, with their team counts, and how
// many users there are.
func (s *Store) UsersPage(ctx context.Context, limit, offset int) ([]UserSummary, int64, error) {
	var total int64
	if err := s.Pool.QueryRow(ctx, "SELECT count(*) FROM users").Scan(&total); err != nil {
		return nil, 0, mapErr(err, "count users")
	}
	rows, _ := s.Pool.Query(ctx, `SELECT u.id, u.email, u.name, u.is_admin, u.status, u.created_at,
			(SELECT count(*) FROM team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL WHERE m.user_id = u.id) AS teams_joined,
			(SELECT count(*) FROM team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL WHERE m.user_id = u.id AND m.role = 'owner') AS teams_owned
		FROM users u ORDER BY u.created_at, u.id LIMIT $1 OFFSET $2`, limit, offset)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[UserSummary])
	return out, total, mapErr(err, "users page")
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
