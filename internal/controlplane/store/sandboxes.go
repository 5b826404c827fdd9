package store

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
)

// Sandbox is a capsule as the control plane records it.
type Sandbox struct {
	ID           string            `db:"id"`
	TeamID       string            `db:"team_id"`
	HostID       *string           `db:"host_id"`
	Template     string            `db:"template"`
	Status       string            `db:"status"`
	VCPUs        int32             `db:"vcpus"`
	MemoryMB     int32             `db:"memory_mb"`
	DiskSizeMB   *int32            `db:"disk_size_mb"`
	TimeoutSec   int32             `db:"timeout_sec"`
	AutoPause    bool              `db:"auto_pause"`
	Metadata     map[string]string `db:"metadata"`
	GuestIP      string            `db:"guest_ip"`
	HostIP       string            `db:"host_ip"`
	Error        string            `db:"error"`
	CreatedBy    *string           `db:"created_by"`
	CreatedAt    time.Time         `db:"created_at"`
	StartedAt    *time.Time        `db:"started_at"`
	LastActiveAt *time.Time        `db:"last_active_at"`
	LastUpdated  time.Time         `db:"last_updated"`
	StoppedAt    *time.Time        `db:"stopped_at"`
	Egress       Egress            `db:"egress"`
	// Public capsules' ports answer anyone through the ingress.
	Public bool `db:"public"`
	// AutoResume resumes a paused capsule on its first ingress request.
	AutoResume bool `db:"auto_resume"`
	// EndAt is an absolute deadline (E2B's timeout), nil for none.
	EndAt *time.Time `db:"end_at"`
	// StartedFrom is "memory" (its template's memory) or "boot"; BootNote
	// says why one whose template has memory booted.
	StartedFrom string `db:"started_from"`
	BootNote    string `db:"boot_note"`
	// DefaultUser runs /v1 commands and file calls that name nobody ("":
	// root); it comes from the template.
	DefaultUser string `db:"default_user"`
}

// Egress is a capsule's outbound policy: mode allow_all (with an optional
// deny list), deny_all, or allow_list.
type Egress struct {
	Mode  string   `json:"mode"`
	Allow []string `json:"allow,omitempty"`
	Deny  []string `json:"deny,omitempty"`
}

const sandboxCols = `id, team_id, host_id, template, status, vcpus, memory_mb, disk_size_mb, timeout_sec, auto_pause,
	metadata, guest_ip, host_ip, error, created_by, created_at, started_at, last_active_at, last_updated, stopped_at, egress,
	public, auto_resume, end_at, started_from, boot_note, default_user`

// Live states hold resources on a host.
var Live = []string{"pending", "starting", "running", "pausing", "paused", "resuming", "stopping"}

// InsertSandbox records a capsule about to be created and returns the
// stored row.
func (s *Store) InsertSandbox(ctx context.Context, sb Sandbox) (Sandbox, error) {
	stored, err := insertSandbox(ctx, s.Pool, sb, s.seal(ids.Random(20)))
	return stored, mapErr(err, "insert capsule")
}

// querier runs queries: the pool or a transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// insertSandbox stores a new capsule with its traffic token (sealed by the caller).
func insertSandbox(ctx context.Context, q querier, sb Sandbox, trafficToken string) (Sandbox, error) {
	if sb.Metadata == nil {
		sb.Metadata = map[string]string{}
	}
	if sb.Egress.Mode == "" {
		sb.Egress.Mode = "allow_all"
	}
	rows, _ := q.Query(ctx, `INSERT INTO sandboxes (id, team_id, host_id, template, status, vcpus, memory_mb, disk_size_mb,
		timeout_sec, auto_pause, metadata, created_by, egress, public, auto_resume, traffic_token, end_at, default_user)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) RETURNING `+sandboxCols,
		sb.ID, sb.TeamID, sb.HostID, sb.Template, sb.Status, sb.VCPUs, sb.MemoryMB, sb.DiskSizeMB, sb.TimeoutSec, sb.AutoPause, sb.Metadata, sb.CreatedBy, sb.Egress,
		sb.Public, sb.AutoResume, trafficToken, sb.EndAt, sb.DefaultUser)
	return pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Sandbox])
}

// Sandbox returns one of a team's capsules; another team's is ErrNotFound.
// An empty teamID (platform admin, background jobs) matches any team.
func (s *Store) Sandbox(ctx context.Context, teamID, id string) (Sandbox, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+sandboxCols+" FROM sandboxes WHERE id = $1 AND ($2 = '' OR team_id = $2)", id, teamID)
	sb, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Sandbox])
	return sb, mapErr(err, "capsule")
}

// SandboxFilter narrows a listing.
type SandboxFilter struct {
	TeamID   string            // "" lists every team (admins)
	HostID   string            // "" any host
	Statuses []string          // empty: any
	Metadata map[string]string // all pairs must match
	Limit    int
	// StartedAfter, Template, Ascending and After page and filter as
	// E2B's list does: After is the last row of the page before.
	// StartedAfter compares the time it started (created, before that).
	StartedAfter *time.Time
	Template     string
	Ascending    bool
	After        *Cursor
}

// Cursor is a position in a listing ordered by creation time and id.
type Cursor struct {
	CreatedAt time.Time
	ID        string
}

// Sandboxes lists capsules, newest first.
func (s *Store) Sandboxes(ctx context.Context, f SandboxFilter) ([]Sandbox, error) {
	var where []string
	var args []any
	add := func(cond string, v any) {
		args = append(args, v)
		where = append(where, fmt.Sprintf(cond, len(args)))
	}
	if f.TeamID != "" {
		add("team_id = $%d", f.TeamID)
	}
	if f.HostID != "" {
		add("host_id = $%d", f.HostID)
	}
	if len(f.Statuses) > 0 {
		add("status = ANY($%d)", f.Statuses)
	}
	if len(f.Metadata) > 0 {
		add("metadata @> $%d", f.Metadata)
	}
	if f.StartedAfter != nil {
		add("coalesce(started_at, created_at) >= $%d", *f.StartedAfter)
	}
	if f.Template != "" {
		add("template = $%d", f.Template)
	}
	order := " ORDER BY created_at DESC, id DESC"
	if f.Ascending {
		order = " ORDER BY created_at, id"
	}
	if f.After != nil {
		args = append(args, f.After.CreatedAt, f.After.ID)
		cmp := "<"
		if f.Ascending {
			cmp = ">"
		}
		where = append(where, fmt.Sprintf("(created_at, id) %s ($%d, $%d)", cmp, len(args)-1, len(args)))
	}
	q := "SELECT " + sandboxCols + " FROM sandboxes"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += order
	if f.Limit > 0 {
		q += fmt.Sprintf(" LIMIT %d", f.Limit)
	}
	rows, _ := s.Pool.Query(ctx, q, args...)
	sbs, err := pgx.CollectRows(rows, pgx.RowToStructByName[Sandbox])
	return sbs, mapErr(err, "list capsules")
}

// Transition moves a capsule from one of the states in from to state to,
// applying set (column = value pairs) in the same write. It returns
// ErrConflict, with the current row, when the capsule is in another state.
func (s *Store) Transition(ctx context.Context, id string, from []string, to string, set map[string]any) (Sandbox, error) {
	cols := []string{"status = $2", "last_updated = now()"}
	if to == "stopped" || to == "error" {
		cols = append(cols, "envd_token = NULL", "traffic_token = NULL") // credentials die with the capsule
	}
	args := []any{id, to, from}
	for k, v := range set {
		if v == Now {
			cols = append(cols, k+" = now()")
			continue
		}
		if sec, ok := v.(Secret); ok {
			v = s.seal(string(sec))
		}
		args = append(args, v)
		cols = append(cols, fmt.Sprintf("%s = $%d", k, len(args)))
	}
	rows, _ := s.Pool.Query(ctx, "UPDATE sandboxes SET "+strings.Join(cols, ", ")+
		" WHERE id = $1 AND status = ANY($3) RETURNING "+sandboxCols, args...)
	sb, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Sandbox])
	if err == pgx.ErrNoRows {
		cur, gerr := s.Sandbox(ctx, "", id)
		if gerr != nil {
			return Sandbox{}, gerr
		}
		return cur, fmt.Errorf("capsule %s is %s: %w", id, cur.Status, ErrConflict)
	}
	return sb, mapErr(err, "update capsule")
}

// Secret is a value Transition stores sealed.
type Secret string

// nowMarker stands for the database's now() in Transition's set.
type nowMarker struct{}

// Now, as a value in Transition's set, writes the database's clock.
var Now = nowMarker{}

// Touch records activity on a running capsule (exec, ping, files).
func (s *Store) Touch(ctx context.Context, id string) error {
	_, err := s.Pool.Exec(ctx, "UPDATE sandboxes SET last_active_at = now() WHERE id = $1 AND status = 'running'", id)
	return mapErr(err, "touch capsule")
}

// SetDeadline sets a capsule's absolute deadline; extendOnly keeps a
// later one (E2B's connect only ever extends).
func (s *Store) SetDeadline(ctx context.Context, id string, at time.Time, extendOnly bool) error {
	q := "UPDATE sandboxes SET end_at = $2, last_updated = now() WHERE id = $1"
	if extendOnly {
		q = "UPDATE sandboxes SET end_at = greatest(coalesce(end_at, $2), $2), last_updated = now() WHERE id = $1"
	}
	_, err := s.Pool.Exec(ctx, q, id, at)
	return mapErr(err, "set deadline")
}

// SetTimeout changes a capsule's inactivity timeout (0: none).
func (s *Store) SetTimeout(ctx context.Context, id string, seconds int) error {
	_, err := s.Pool.Exec(ctx, "UPDATE sandboxes SET timeout_sec = $2, last_updated = now() WHERE id = $1", id, seconds)
	return mapErr(err, "set timeout")
}

// Expired lists running capsules idle past their timeout, or past their
// absolute deadline.
func (s *Store) Expired(ctx context.Context) ([]Sandbox, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+sandboxCols+" FROM sandboxes WHERE "+expired)
	sbs, err := pgx.CollectRows(rows, pgx.RowToStructByName[Sandbox])
	return sbs, mapErr(err, "expired capsules")
}

// expired is the condition of a capsule running past its end or its
// inactivity timeout.
const expired = `status = 'running' AND (end_at < now() OR timeout_sec > 0
	AND coalesce(last_active_at, started_at, created_at) + make_interval(secs => timeout_sec) < now())`

// StillExpired says whether capsule id is still running past its timeout
// (Expired's rule), for a job that acts on an earlier listing: a ping or
// a longer timeout since then saves it.
func (s *Store) StillExpired(ctx context.Context, id string) (bool, error) {
	var n int
	err := s.Pool.QueryRow(ctx, "SELECT count(*) FROM sandboxes WHERE id = $1 AND "+expired, id).Scan(&n)
	return n == 1, mapErr(err, "expired capsule")
}

// StopExpired moves capsule id to stopping if it is still running past
// its timeout (Expired's rule), in one statement: a ping or a longer
// timeout that lands at the same moment either comes first and saves it,
// or finds it stopping.
func (s *Store) StopExpired(ctx context.Context, id string) (bool, error) {
	tag, err := s.Pool.Exec(ctx, "UPDATE sandboxes SET status = 'stopping', last_updated = now() WHERE id = $1 AND "+expired, id)
	if err != nil {
		return false, mapErr(err, "stop expired capsule")
	}
	return tag.RowsAffected() == 1, nil
}

// PauseExpired moves capsule id to pausing if it is still running past
// its timeout, in one statement (as StopExpired).
func (s *Store) PauseExpired(ctx context.Context, id string) (bool, error) {
	tag, err := s.Pool.Exec(ctx, "UPDATE sandboxes SET status = 'pausing', last_updated = now() WHERE id = $1 AND "+expired, id)
	if err != nil {
		return false, mapErr(err, "pause expired capsule")
	}
	return tag.RowsAffected() == 1, nil
}

// Stuck lists capsules in a transitional state for longer than age: a
// replica died in the middle of an operation.
func (s *Store) Stuck(ctx context.Context, age time.Duration) ([]Sandbox, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+sandboxCols+` FROM sandboxes
		WHERE status IN ('pending', 'starting', 'pausing', 'resuming', 'stopping') AND last_updated < now() - $1::interval`, age.String())
	sbs, err := pgx.CollectRows(rows, pgx.RowToStructByName[Sandbox])
	return sbs, mapErr(err, "stuck capsules")
}

// TeamUsage sums the live reservations of a team.
func (s *Store) TeamUsage(ctx context.Context, teamID string) (running, vcpus, memoryMB int64, err error) {
	err = s.Pool.QueryRow(ctx, `SELECT count(*), coalesce(sum(vcpus), 0), coalesce(sum(memory_mb), 0)
		FROM sandboxes WHERE team_id = $1 AND status IN ('starting', 'running', 'resuming', 'pausing')`, teamID).Scan(&running, &vcpus, &memoryMB)
	return running, vcpus, memoryMB, mapErr(err, "team usage")
}
