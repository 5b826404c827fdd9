package store

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// User is an account.
type User struct {
	ID           string    `db:"id"`
	Email        string    `db:"email"`
	Name         string    `db:"name"`
	PasswordHash string    `db:"password_hash"`
	IsAdmin      bool      `db:"is_admin"`
	Status       string    `db:"status"`
	CreatedAt    time.Time `db:"created_at"`
	UpdatedAt    time.Time `db:"updated_at"`
	// LoginBlockedUntil is set after repeated failed logins.
	LoginBlockedUntil *time.Time `db:"login_blocked_until"`
	// SessionEpoch is in every JWT issued to the user; raising it ends them.
	SessionEpoch int32 `db:"session_epoch"`
}

// Team is a tenant: every capsule, key and snapshot belongs to one.
type Team struct {
	ID        string     `db:"id"`
	Name      string     `db:"name"`
	Slug      string     `db:"slug"`
	IsBYOC    bool       `db:"is_byoc"` // a platform admin let it run hosts of its own
	CreatedAt time.Time  `db:"created_at"`
	DeletedAt *time.Time `db:"deleted_at"`
}

// PlatformTeamID is the team of platform capsules (migration 00015): it
// has no members; platform admins reach its capsules under
// /v1/admin/capsules.
const PlatformTeamID = "team-platform"

// TeamWithRole is a team seen by one of its members.
type TeamWithRole struct {
	Team
	Role string `db:"role"`
}

// Member is a user's membership of a team.
type Member struct {
	UserID   string    `db:"user_id"`
	Email    string    `db:"email"`
	Name     string    `db:"name"`
	Role     string    `db:"role"`
	JoinedAt time.Time `db:"joined_at"`
}

const userCols = "id, email, name, password_hash, is_admin, status, created_at, updated_at, login_blocked_until, session_epoch"

// userColsU is userCols of a query's "u" (computed once: requests with a
// user JWT read it).
var userColsU = prefixed("u.", userCols)

// signupLock makes "is this the first user?" and the insert one step.
const signupLock = 0x77726e6e00000002

// CreateUser inserts u and its first team (u as owner). The first user of
// an install, or one created with makeAdmin, is a platform admin. It
// returns the stored user.
func (s *Store) CreateUser(ctx context.Context, u User, team Team, makeAdmin bool) (User, error) {
	return s.createUser(ctx, u, team, makeAdmin, nil)
}

// createUser is CreateUser with more to do in its transaction.
func (s *Store) createUser(ctx context.Context, u User, team Team, makeAdmin bool, also func(pgx.Tx) error) (User, error) {
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(signupLock)); err != nil {
			return err
		}
		var users int
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM users").Scan(&users); err != nil {
			return err
		}
		u.IsAdmin = makeAdmin || users == 0
		if err := tx.QueryRow(ctx, `INSERT INTO users (id, email, name, password_hash, is_admin, status)
			VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at, updated_at`,
			u.ID, u.Email, u.Name, u.PasswordHash, u.IsAdmin, u.Status).Scan(&u.CreatedAt, &u.UpdatedAt); err != nil {
			return err
		}
		if err := insertTeam(ctx, tx, team, u.ID); err != nil || also == nil {
			return err
		}
		return also(tx)
	})
	return u, mapErr(err, "create user")
}

func insertTeam(ctx context.Context, tx pgx.Tx, team Team, owner string) error {
	if _, err := tx.Exec(ctx, "INSERT INTO teams (id, name, slug) VALUES ($1, $2, $3)", team.ID, team.Name, team.Slug); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, "INSERT INTO team_members (team_id, user_id, role) VALUES ($1, $2, 'owner')", team.ID, owner)
	return err
}

// UserByEmail finds an account by email, case-insensitively.
func (s *Store) UserByEmail(ctx context.Context, email string) (User, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+userCols+" FROM users WHERE lower(email) = lower($1)", email)
	u, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[User])
	return u, mapErr(err, "user")
}

// UserByID finds an account.
func (s *Store) UserByID(ctx context.Context, id string) (User, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+userCols+" FROM users WHERE id = $1", id)
	u, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[User])
	return u, mapErr(err, "user")
}

// Membership is a user's place in one team.
type Membership struct {
	Role string // "" when not a member
	// Key is new for every membership (a user removed and added back has
	// another); user JWTs for the team carry it.
	Key string
}

// UserInTeam returns an account and its membership of a live team in one
// query: every request with a user JWT needs both.
func (s *Store) UserInTeam(ctx context.Context, userID, teamID string) (User, Membership, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+userColsU+`, coalesce(m.role, '') AS role, coalesce(m.session_key::text, '') AS session_key
		FROM users u LEFT JOIN (team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL)
			ON m.user_id = u.id AND m.team_id = $2
		WHERE u.id = $1`, userID, teamID)
	row, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[struct {
		User
		Role string `db:"role"`
		Key  string `db:"session_key"`
	}])
	return row.User, Membership{Role: row.Role, Key: row.Key}, mapErr(err, "user")
}

// MembershipKey is the key of userID's membership of a live team.
func (s *Store) MembershipKey(ctx context.Context, teamID, userID string) (string, error) {
	var key string
	err := s.Pool.QueryRow(ctx, `SELECT m.session_key::text FROM team_members m JOIN teams t ON t.id = m.team_id
		WHERE m.team_id = $1 AND m.user_id = $2 AND t.deleted_at IS NULL`, teamID, userID).Scan(&key)
	return key, mapErr(err, "membership")
}

// SetPassword replaces a user's password hash and ends every session
// issued before (it returns the new session epoch).
func (s *Store) SetPassword(ctx context.Context, userID, hash string) (int32, error) {
	var epoch int32
	err := s.Pool.QueryRow(ctx, `UPDATE users SET password_hash = $2, session_epoch = session_epoch + 1, failed_logins = 0,
		login_blocked_until = NULL, updated_at = now() WHERE id = $1 RETURNING session_epoch`, userID, hash).Scan(&epoch)
	return epoch, mapErr(err, "set password")
}

// LoginAttempt claims one password check for the account, counted as a
// failure until LoginSucceeded clears it: from the threshold-th failure in
// a row on, the account waits base, 2*base, 4*base ... up to max between
// attempts. The claim and the count are one update of the user's row, so
// parallel guesses cannot all pass before the first is counted. While the
// account waits it returns ok false and when the wait ends.
func (s *Store) LoginAttempt(ctx context.Context, userID string, threshold int, base, max time.Duration) (ok bool, until time.Time, err error) {
	tag, err := s.Pool.Exec(ctx, `UPDATE users SET failed_logins = failed_logins + 1,
			login_blocked_until = CASE WHEN failed_logins + 1 >= $2
				THEN now() + least($3::interval * power(2, least(failed_logins + 1 - $2, 30)), $4::interval) END
		WHERE id = $1 AND (login_blocked_until IS NULL OR login_blocked_until <= now())`, userID, threshold, base.String(), max.String())
	if err != nil {
		return false, time.Time{}, mapErr(err, "login attempt")
	}
	if tag.RowsAffected() == 1 {
		return true, time.Time{}, nil
	}
	var blocked *time.Time
	err = s.Pool.QueryRow(ctx, "SELECT login_blocked_until FROM users WHERE id = $1", userID).Scan(&blocked)
	if err == nil && blocked != nil {
		until = *blocked
	}
	return false, until, mapErr(err, "login attempt")
}

// LoginSucceeded clears the count of failed logins.
func (s *Store) LoginSucceeded(ctx context.Context, userID string) error {
	_, err := s.Pool.Exec(ctx, "UPDATE users SET failed_logins = 0, login_blocked_until = NULL WHERE id = $1 AND failed_logins > 0", userID)
	return mapErr(err, "login succeeded")
}

// SetUserName renames a user.
func (s *Store) SetUserName(ctx context.Context, userID, name string) error {
	return s.execOne(ctx, "set name", "UPDATE users SET name = $2, updated_at = now() WHERE id = $1", userID, name)
}

// SetUserStatus activates or disables a user; disabling ends every
// session issued before (they stay ended after reactivation).
func (s *Store) SetUserStatus(ctx context.Context, userID, status string) error {
	return s.execOne(ctx, "set status", `UPDATE users SET status = $2, updated_at = now(),
		session_epoch = session_epoch + CASE WHEN $2 = 'disabled' THEN 1 ELSE 0 END WHERE id = $1`, userID, status)
}

// SetAdmin grants or revokes platform admin; the last admin stays.
func (s *Store) SetAdmin(ctx context.Context, userID string, admin bool) error {
	return mapErr(s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(signupLock)); err != nil {
			return err
		}
		if !admin {
			var others int
			if err := tx.QueryRow(ctx, "SELECT count(*) FROM users WHERE is_admin AND id <> $1", userID).Scan(&others); err != nil {
				return err
			}
			if others == 0 {
				return ErrConflict
			}
		}
		tag, err := tx.Exec(ctx, "UPDATE users SET is_admin = $2, updated_at = now() WHERE id = $1", userID, admin)
		if err == nil && tag.RowsAffected() == 0 {
			return pgx.ErrNoRows
		}
		return err
	}), "set admin")
}

// AddUserToken stores the hash of a one-time token mailed to a user.
func (s *Store) AddUserToken(ctx context.Context, userID, kind, hash string, expires time.Time) error {
	_, err := s.Pool.Exec(ctx, "INSERT INTO user_tokens (token_hash, user_id, kind, expires_at) VALUES ($1, $2, $3, $4)", hash, userID, kind, expires)
	return mapErr(err, "add token")
}

// UseUserToken consumes a one-time token and returns its user; used,
// expired or unknown tokens are ErrNotFound.
func (s *Store) UseUserToken(ctx context.Context, kind, hash string) (string, error) {
	var userID string
	err := s.Pool.QueryRow(ctx, `UPDATE user_tokens SET used_at = now()
		WHERE token_hash = $1 AND kind = $2 AND used_at IS NULL AND expires_at > now() RETURNING user_id`, hash, kind).Scan(&userID)
	return userID, mapErr(err, "use token")
}

// TeamsForUser lists the live teams a user belongs to, oldest first.
func (s *Store) TeamsForUser(ctx context.Context, userID string) ([]TeamWithRole, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT t.id, t.name, t.slug, t.is_byoc, t.created_at, t.deleted_at, m.role
		FROM teams t JOIN team_members m ON m.team_id = t.id
		WHERE m.user_id = $1 AND t.deleted_at IS NULL ORDER BY m.joined_at, t.id`, userID)
	ts, err := pgx.CollectRows(rows, pgx.RowToStructByName[TeamWithRole])
	return ts, mapErr(err, "list teams")
}

// CreateTeam makes a team owned by owner.
func (s *Store) CreateTeam(ctx context.Context, team Team, owner string) error {
	return mapErr(s.inTx(ctx, func(tx pgx.Tx) error { return insertTeam(ctx, tx, team, owner) }), "create team")
}

// MemberRole is userID's role in a live team, or ErrNotFound.
func (s *Store) MemberRole(ctx context.Context, teamID, userID string) (string, error) {
	var role string
	err := s.Pool.QueryRow(ctx, `SELECT m.role FROM team_members m JOIN teams t ON t.id = m.team_id
		WHERE m.team_id = $1 AND m.user_id = $2 AND t.deleted_at IS NULL`, teamID, userID).Scan(&role)
	return role, mapErr(err, "member")
}

// Team returns a live team.
func (s *Store) Team(ctx context.Context, id string) (Team, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT id, name, slug, is_byoc, created_at, deleted_at FROM teams WHERE id = $1 AND deleted_at IS NULL", id)
	t, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Team])
	return t, mapErr(err, "team")
}

// Members lists a team's members.
func (s *Store) Members(ctx context.Context, teamID string) ([]Member, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT m.user_id, u.email, u.name, m.role, m.joined_at
		FROM team_members m JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 ORDER BY m.joined_at, u.email`, teamID)
	ms, err := pgx.CollectRows(rows, pgx.RowToStructByName[Member])
	return ms, mapErr(err, "members")
}

// AddMember adds userID to a team as a member.
func (s *Store) AddMember(ctx context.Context, teamID, userID, role string) error {
	_, err := s.Pool.Exec(ctx, "INSERT INTO team_members (team_id, user_id, role) VALUES ($1, $2, $3)", teamID, userID, role)
	return mapErr(err, "add member")
}

// SetMemberRole changes a non-owner's role.
func (s *Store) SetMemberRole(ctx context.Context, teamID, userID, role string) error {
	return s.execOne(ctx, "set role", "UPDATE team_members SET role = $3 WHERE team_id = $1 AND user_id = $2 AND role <> 'owner'", teamID, userID, role)
}

// RemoveMember removes a non-owner from a team and revokes the API keys
// they made for it; it returns how many keys went.
func (s *Store) RemoveMember(ctx context.Context, teamID, userID string) (int64, error) {
	var revoked int64
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2 AND role <> 'owner'", teamID, userID)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return pgx.ErrNoRows
		}
		tag, err = tx.Exec(ctx, "DELETE FROM api_keys WHERE team_id = $1 AND created_by = $2", teamID, userID)
		revoked = tag.RowsAffected()
		return err
	})
	return revoked, mapErr(err, "remove member")
}

// RenameTeam renames a live team.
func (s *Store) RenameTeam(ctx context.Context, teamID, name string) error {
	return s.execOne(ctx, "rename team", "UPDATE teams SET name = $2 WHERE id = $1 AND deleted_at IS NULL", teamID, name)
}

// SetTeamBYOC enables or disables hosts of a team's own (BYOC) for a live team.
func (s *Store) SetTeamBYOC(ctx context.Context, teamID string, enabled bool) error {
	return s.execOne(ctx, "set byoc", "UPDATE teams SET is_byoc = $2 WHERE id = $1 AND deleted_at IS NULL", teamID, enabled)
}

// DeleteTeam marks a team deleted; its rows stay for the audit trail.
func (s *Store) DeleteTeam(ctx context.Context, teamID string) error {
	return s.execOne(ctx, "delete team", "UPDATE teams SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL", teamID)
}

// execOne runs a write that must touch exactly one row.
func (s *Store) execOne(ctx context.Context, what, sql string, args ...any) error {
	tag, err := s.Pool.Exec(ctx, sql, args...)
	if err != nil {
		return mapErr(err, what)
	}
	if tag.RowsAffected() == 0 {
		return mapErr(pgx.ErrNoRows, what)
	}
	return nil
}

// DeletePendingUser removes a never-activated account and the team made
// for it, so the email can sign up again. With onlyStale it does so only
// when no activation token is still valid.
func (s *Store) DeletePendingUser(ctx context.Context, email string, onlyStale bool) error {
	return mapErr(s.inTx(ctx, func(tx pgx.Tx) error {
		var id string
		err := tx.QueryRow(ctx, `SELECT id FROM users u WHERE lower(email) = lower($1) AND status = 'pending'
			AND (NOT $2 OR NOT EXISTS (SELECT 1 FROM user_tokens t WHERE t.user_id = u.id AND t.kind = 'activation'
				AND t.used_at IS NULL AND t.expires_at > now()))`, email, onlyStale).Scan(&id)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM teams WHERE id IN (SELECT team_id FROM team_members WHERE user_id = $1 AND role = 'owner')`, id); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DELETE FROM users WHERE id = $1", id)
		return err
	}), "delete pending user")
}
