package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// APIKey is a team's key; only its hash is stored. A key acts for its
// team only while the user who made it is an active member of that team.
type APIKey struct {
	ID           string     `db:"id"`
	TeamID       string     `db:"team_id"`
	Name         string     `db:"name"`
	KeyPrefix    string     `db:"key_prefix"`
	CreatedBy    *string    `db:"created_by"`
	CreatorEmail *string    `db:"creator_email"`
	CreatedAt    time.Time  `db:"created_at"`
	LastUsed     *time.Time `db:"last_used"`
	// CreatorActive: the creator is an active member of the key's team.
	CreatorActive bool `db:"creator_active"`
}

const apiKeyCols = `k.id, k.team_id, k.name, k.key_prefix, k.created_by, u.email AS creator_email, k.created_at, k.last_used,
	coalesce(u.status = 'active' AND EXISTS (SELECT 1 FROM team_members m WHERE m.team_id = k.team_id AND m.user_id = k.created_by), false) AS creator_active`

// CreateAPIKey stores a key's hash.
func (s *Store) CreateAPIKey(ctx context.Context, k APIKey, hash string) (APIKey, error) {
	err := s.Pool.QueryRow(ctx, `INSERT INTO api_keys (id, team_id, name, key_hash, key_prefix, created_by)
		VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at`, k.ID, k.TeamID, k.Name, hash, k.KeyPrefix, k.CreatedBy).Scan(&k.CreatedAt)
	if err != nil {
		return k, mapErr(err, "create API key")
	}
	return s.APIKey(ctx, k.TeamID, k.ID)
}

// APIKey returns one of a team's keys.
func (s *Store) APIKey(ctx context.Context, teamID, id string) (APIKey, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+apiKeyCols+" FROM api_keys k LEFT JOIN users u ON u.id = k.created_by WHERE k.team_id = $1 AND k.id = $2", teamID, id)
	k, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[APIKey])
	return k, mapErr(err, "API key")
}

// APIKeys lists a team's keys, newest first.
func (s *Store) APIKeys(ctx context.Context, teamID string) ([]APIKey, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+apiKeyCols+" FROM api_keys k LEFT JOIN users u ON u.id = k.created_by WHERE k.team_id = $1 ORDER BY k.created_at DESC, k.id", teamID)
	ks, err := pgx.CollectRows(rows, pgx.RowToStructByName[APIKey])
	return ks, mapErr(err, "list API keys")
}

// DeleteAPIKey revokes one of a team's keys.
func (s *Store) DeleteAPIKey(ctx context.Context, teamID, id string) error {
	return s.execOne(ctx, "delete API key", "DELETE FROM api_keys WHERE team_id = $1 AND id = $2", teamID, id)
}

// APIKeyByID finds a live team's key by its ID.
func (s *Store) APIKeyByID(ctx context.Context, id string) (APIKey, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT `+apiKeyCols+`
		FROM api_keys k JOIN teams t ON t.id = k.team_id LEFT JOIN users u ON u.id = k.created_by
		WHERE k.id = $1 AND t.deleted_at IS NULL`, id)
	k, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[APIKey])
	return k, mapErr(err, "API key")
}

// APIKeyByHash finds the key a request presents, if its team is live,
// and records that it was used (at most one write a minute per key, so
// busy keys do not turn every read into a write). The caller checks
// CreatorActive.
func (s *Store) APIKeyByHash(ctx context.Context, hash string) (APIKey, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT `+apiKeyCols+`
		FROM api_keys k JOIN teams t ON t.id = k.team_id LEFT JOIN users u ON u.id = k.created_by
		WHERE k.key_hash = $1 AND t.deleted_at IS NULL`, hash)
	k, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[APIKey])
	if err != nil {
		return k, mapErr(err, "API key")
	}
	if !k.CreatorActive {
		return k, nil // refused by the caller: no use to record
	}
	if k.LastUsed == nil || time.Since(*k.LastUsed) > time.Minute {
		if _, err := s.Pool.Exec(ctx, "UPDATE api_keys SET last_used = now() WHERE id = $1", k.ID); err != nil {
			s.log.Warn("record API key use", "key", k.ID, "err", err)
		}
	}
	return k, nil
}
