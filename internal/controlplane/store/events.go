package store

import (
	"context"
	"encoding/json"
	"time"

	"github.com/jackc/pgx/v5"
)

// Event is one lifecycle event, written by the database triggers.
type Event struct {
	Seq        int64           `db:"seq"`
	ID         string          `db:"id"`
	TeamID     *string         `db:"team_id"`
	Event      string          `db:"event"`
	ResourceID string          `db:"resource_id"`
	Payload    json.RawMessage `db:"payload"`
	CreatedAt  time.Time       `db:"created_at"`
}

const eventCols = "seq, id, team_id, event, resource_id, payload, created_at"

// EventsAfter returns up to limit events after seq, oldest first; an
// empty teamID returns every team's (and hosts' team-less) events.
func (s *Store) EventsAfter(ctx context.Context, teamID string, after int64, limit int) ([]Event, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+eventCols+` FROM events
		WHERE seq > $2 AND ($1 = '' OR team_id = $1) ORDER BY seq LIMIT $3`, teamID, after, limit)
	evs, err := pgx.CollectRows(rows, pgx.RowToStructByName[Event])
	return evs, mapErr(err, "events")
}

// LastEventSeq is the newest event's sequence number (0 when none).
func (s *Store) LastEventSeq(ctx context.Context) (int64, error) {
	var seq int64
	err := s.Pool.QueryRow(ctx, "SELECT coalesce(max(seq), 0) FROM events").Scan(&seq)
	return seq, mapErr(err, "last event")
}

// AddEventTicket stores a single-use SSE ticket.
func (s *Store) AddEventTicket(ctx context.Context, hash string, t Ticket, ttl time.Duration) error {
	var team, user, key *string
	if t.TeamID != "" {
		team = &t.TeamID
	}
	if t.UserID != "" {
		user = &t.UserID
	}
	if t.KeyID != "" {
		key = &t.KeyID
	}
	_, err := s.Pool.Exec(ctx, `INSERT INTO event_tickets (token_hash, team_id, admin, scope, user_id, key_id, session_epoch, membership, expires_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + $9::interval)`,
		hash, team, t.Admin, t.Scope, user, key, t.Epoch, t.Membership, ttl.String())
	return mapErr(err, "event ticket")
}

// Ticket is what a single-use ticket grants: one stream (Scope, a path)
// of one team, or of the platform for an admin, on behalf of the
// credential it was issued to (a user's session or an API key).
type Ticket struct {
	TeamID     string
	Admin      bool
	Scope      string
	UserID     string
	KeyID      string
	Epoch      int32
	Membership string
}

// UseEventTicket consumes a ticket; ErrNotFound when it is unknown, used
// or expired.
func (s *Store) UseEventTicket(ctx context.Context, hash string) (Ticket, error) {
	var t Ticket
	var team, user, key *string
	err := s.Pool.QueryRow(ctx, `DELETE FROM event_tickets WHERE token_hash = $1 AND expires_at > now()
		RETURNING team_id, admin, scope, user_id, key_id, session_epoch, membership`, hash).Scan(&team, &t.Admin, &t.Scope, &user, &key, &t.Epoch, &t.Membership)
	for _, f := range []struct {
		in  *string
		out *string
	}{{team, &t.TeamID}, {user, &t.UserID}, {key, &t.KeyID}} {
		if f.in != nil {
			*f.out = *f.in
		}
	}
	return t, mapErr(err, "event ticket")
}

// Channel is a team's notification target.
type Channel struct {
	ID              string            `db:"id"`
	TeamID          string            `db:"team_id"`
	Name            string            `db:"name"`
	Provider        string            `db:"provider"`
	Config          map[string]string `db:"config"`
	Events          []string          `db:"events"`
	DeliveredSeq    int64             `db:"delivered_seq"`
	Attempts        int32             `db:"attempts"`
	NextAttemptAt   time.Time         `db:"next_attempt_at"`
	LastError       string            `db:"last_error"`
	LastDeliveredAt *time.Time        `db:"last_delivered_at"`
	CreatedAt       time.Time         `db:"created_at"`
	UpdatedAt       time.Time         `db:"updated_at"`
}

const channelCols = `id, team_id, name, provider, config, events, delivered_seq, attempts, next_attempt_at, last_error,
	last_delivered_at, created_at, updated_at`

// channels collects channel rows with their configs opened.
func (s *Store) channels(rows pgx.Rows, what string) ([]Channel, error) {
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[Channel])
	if err == nil {
		err = s.openChannels(out)
	}
	return out, mapErr(err, what)
}

func (s *Store) oneChannel(rows pgx.Rows, what string) (Channel, error) {
	out, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Channel])
	if err == nil {
		err = s.unsealMap(out.Config)
	}
	return out, mapErr(err, what)
}

// CreateChannel stores a channel that starts with the next event (no
// replay of history).
func (s *Store) CreateChannel(ctx context.Context, ch Channel) (Channel, error) {
	rows, _ := s.Pool.Query(ctx, `INSERT INTO channels (id, team_id, name, provider, config, events, delivered_seq)
		VALUES ($1, $2, $3, $4, $5, $6, (SELECT coalesce(max(seq), 0) FROM events)) RETURNING `+channelCols,
		ch.ID, ch.TeamID, ch.Name, ch.Provider, s.sealMap(ch.Config), ch.Events)
	return s.oneChannel(rows, "create channel")
}

// Channels lists a team's channels.
func (s *Store) Channels(ctx context.Context, teamID string) ([]Channel, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+channelCols+" FROM channels WHERE team_id = $1 ORDER BY created_at, id", teamID)
	return s.channels(rows, "channels")
}

// Channel returns one of a team's channels.
func (s *Store) Channel(ctx context.Context, teamID, id string) (Channel, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+channelCols+" FROM channels WHERE team_id = $1 AND id = $2", teamID, id)
	return s.oneChannel(rows, "channel")
}

// UpdateChannel renames a channel and replaces its event list.
func (s *Store) UpdateChannel(ctx context.Context, teamID, id, name string, events []string) (Channel, error) {
	rows, _ := s.Pool.Query(ctx, `UPDATE channels SET name = $3, events = $4, updated_at = now()
		WHERE team_id = $1 AND id = $2 RETURNING `+channelCols, teamID, id, name, events)
	return s.oneChannel(rows, "update channel")
}

// SetChannelConfig replaces a channel's provider settings (secrets).
func (s *Store) SetChannelConfig(ctx context.Context, teamID, id string, config map[string]string) (Channel, error) {
	rows, _ := s.Pool.Query(ctx, `UPDATE channels SET config = $3, updated_at = now(), attempts = 0, next_attempt_at = now()
		WHERE team_id = $1 AND id = $2 RETURNING `+channelCols, teamID, id, s.sealMap(config))
	return s.oneChannel(rows, "rotate channel config")
}

// DeleteChannel removes a channel.
func (s *Store) DeleteChannel(ctx context.Context, teamID, id string) error {
	return s.execOne(ctx, "delete channel", "DELETE FROM channels WHERE team_id = $1 AND id = $2", teamID, id)
}

// DueChannels are channels with events waiting whose retry time has come.
func (s *Store) DueChannels(ctx context.Context) ([]Channel, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+channelCols+` FROM channels c WHERE next_attempt_at <= now()
		AND EXISTS (SELECT 1 FROM events e WHERE e.team_id = c.team_id AND e.seq > c.delivered_seq AND e.event = ANY(c.events))`)
	return s.channels(rows, "due channels")
}

// PendingEvents are a channel's undelivered events, oldest first.
func (s *Store) PendingEvents(ctx context.Context, ch Channel, limit int) ([]Event, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+eventCols+` FROM events
		WHERE team_id = $1 AND seq > $2 AND event = ANY($3) ORDER BY seq LIMIT $4`, ch.TeamID, ch.DeliveredSeq, ch.Events, limit)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[Event])
	return out, mapErr(err, "pending events")
}

// ChannelDelivered records that a channel handled events through seq;
// failure, when not empty, says why the last of them was given up on.
func (s *Store) ChannelDelivered(ctx context.Context, id string, seq int64, failure string) error {
	_, err := s.Pool.Exec(ctx, `UPDATE channels SET delivered_seq = greatest(delivered_seq, $2), attempts = 0, next_attempt_at = now(),
		last_error = $3, last_delivered_at = CASE WHEN $3 = '' THEN now() ELSE last_delivered_at END WHERE id = $1`, id, seq, failure)
	return mapErr(err, "channel delivered")
}

// ChannelFailed schedules the next attempt after a failed delivery.
func (s *Store) ChannelFailed(ctx context.Context, id string, attempts int32, next time.Time, reason string) error {
	_, err := s.Pool.Exec(ctx, "UPDATE channels SET attempts = $2, next_attempt_at = $3, last_error = $4 WHERE id = $1", id, attempts, next, reason)
	return mapErr(err, "channel failed")
}
