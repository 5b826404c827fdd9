package store

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Identity is a user's account at an OAuth provider.
type Identity struct {
	Provider   string    `db:"provider"`
	ProviderID string    `db:"provider_id"`
	UserID     string    `db:"user_id"`
	Email      string    `db:"email"`
	CreatedAt  time.Time `db:"created_at"`
}

// IdentityUser is the user a provider account signs in as.
func (s *Store) IdentityUser(ctx context.Context, provider, providerID string) (User, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+userColsU+` FROM users u
		JOIN oauth_identities i ON i.user_id = u.id WHERE i.provider = $1 AND i.provider_id = $2`, provider, providerID)
	u, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[User])
	return u, mapErr(err, "identity")
}

func prefixed(p, cols string) string {
	parts := strings.Split(cols, ", ")
	for i := range parts {
		parts[i] = p + parts[i]
	}
	return strings.Join(parts, ", ")
}

const insertIdentity = "INSERT INTO oauth_identities (provider, provider_id, user_id, email) VALUES ($1, $2, $3, $4)"

// LinkIdentity gives userID a provider account; ErrConflict when that
// account is another user's, or the user has one of this provider.
func (s *Store) LinkIdentity(ctx context.Context, id Identity) error {
	_, err := s.Pool.Exec(ctx, insertIdentity, id.Provider, id.ProviderID, id.UserID, id.Email)
	return mapErr(err, "link identity")
}

// CreateIdentityUser makes an account that signs in through a provider
// (no password), its first team and its identity, together.
func (s *Store) CreateIdentityUser(ctx context.Context, u User, team Team, id Identity) (User, error) {
	return s.createUser(ctx, u, team, false, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, insertIdentity, id.Provider, id.ProviderID, u.ID, id.Email)
		return err
	})
}

// Identities lists a user's provider accounts.
func (s *Store) Identities(ctx context.Context, userID string) ([]Identity, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT provider, provider_id, user_id, email, created_at FROM oauth_identities WHERE user_id = $1 ORDER BY provider", userID)
	ids, err := pgx.CollectRows(rows, pgx.RowToStructByName[Identity])
	return ids, mapErr(err, "identities")
}

// ErrLastSignIn: removing it would leave the account no way to sign in.
var ErrLastSignIn = errors.New("the account's only way to sign in")

// UnlinkIdentity removes a user's provider account, unless it is the
// only way the user signs in (no password, no other provider).
func (s *Store) UnlinkIdentity(ctx context.Context, userID, provider string) error {
	return mapErr(s.inTx(ctx, func(tx pgx.Tx) error {
		var hash string
		var others int
		if err := tx.QueryRow(ctx, `SELECT password_hash, (SELECT count(*) FROM oauth_identities WHERE user_id = $1 AND provider <> $2)
			FROM users WHERE id = $1 FOR UPDATE`, userID, provider).Scan(&hash, &others); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, "DELETE FROM oauth_identities WHERE user_id = $1 AND provider = $2", userID, provider)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return pgx.ErrNoRows
		}
		if hash == "" && others == 0 {
			return ErrLastSignIn
		}
		return nil
	}), "unlink identity")
}

// UserMatch is one answer of a user search.
type UserMatch struct {
	UserID string `db:"id" json:"user_id"`
	Email  string `db:"email" json:"email"`
	Name   string `db:"name" json:"name"`
}

// SearchUsers lists active accounts whose email starts with prefix.
func (s *Store) SearchUsers(ctx context.Context, prefix string, limit int) ([]UserMatch, error) {
	like := strings.NewReplacer(`\`, `\\`, "%", `\%`, "_", `\_`).Replace(strings.ToLower(prefix)) + "%"
	rows, _ := s.Pool.Query(ctx, `SELECT id, email, name FROM users WHERE lower(email) LIKE $1 AND status = 'active'
		ORDER BY lower(email) LIMIT $2`, like, limit)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[UserMatch])
	return out, mapErr(err, "search users")
}

// AccountBlockers is what stops a user deleting their account.
type AccountBlockers struct {
	SharedTeams int  // teams they own that have other members
	LastAdmin   bool // the install's only platform admin
}

// DeletionBlockers says what stops userID deleting their account, and
// which teams go with it (those they alone belong to as owner).
func (s *Store) DeletionBlockers(ctx context.Context, userID string) (AccountBlockers, []string, error) {
	var b AccountBlockers
	err := s.Pool.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL
			WHERE m.user_id = $1 AND m.role = 'owner'
			AND EXISTS (SELECT 1 FROM team_members o WHERE o.team_id = m.team_id AND o.user_id <> $1)),
		(SELECT is_admin FROM users WHERE id = $1) AND NOT EXISTS (SELECT 1 FROM users WHERE is_admin AND id <> $1 AND status <> 'deleted')`,
		userID).Scan(&b.SharedTeams, &b.LastAdmin)
	if err != nil {
		return b, nil, mapErr(err, "deletion blockers")
	}
	rows, _ := s.Pool.Query(ctx, `SELECT m.team_id FROM team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL
		WHERE m.user_id = $1 AND m.role = 'owner'
		AND NOT EXISTS (SELECT 1 FROM team_members o WHERE o.team_id = m.team_id AND o.user_id <> $1) ORDER BY m.team_id`, userID)
	teams, err := pgx.CollectRows(rows, pgx.RowTo[string])
	return b, teams, mapErr(err, "deletion blockers")
}

// DeleteAccount marks a user deleted: every session ends, the API keys
// they made go, they leave the teams they do not own alone, and the row
// waits for PurgeDeletedUsers (the email and provider accounts stay
// taken until then).
func (s *Store) DeleteAccount(ctx context.Context, userID string) error {
	return mapErr(s.inTx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE users SET status = 'deleted', deleted_at = now(), updated_at = now(),
			session_epoch = session_epoch + 1 WHERE id = $1 AND status <> 'deleted'`, userID)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return pgx.ErrNoRows
		}
		if _, err := tx.Exec(ctx, "DELETE FROM api_keys WHERE created_by = $1", userID); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `DELETE FROM team_members m WHERE m.user_id = $1
			AND EXISTS (SELECT 1 FROM team_members o WHERE o.team_id = m.team_id AND o.user_id <> $1)`, userID)
		return err
	}), "delete account")
}

// PurgeDeletedUsers removes accounts deleted more than grace ago, and
// returns how many.
func (s *Store) PurgeDeletedUsers(ctx context.Context, grace time.Duration) (int64, error) {
	tag, err := s.Pool.Exec(ctx, "DELETE FROM users WHERE status = 'deleted' AND deleted_at < now() - make_interval(secs => $1)", grace.Seconds())
	if err != nil {
		return 0, mapErr(err, "purge deleted users")
	}
	return tag.RowsAffected(), nil
}
