package store

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
)

// Quota is what one team's capsules may hold at once; 0 means no limit.
// Capsules counts live capsules (paused ones too); VCPUs and MemoryMB
// those that run (or are starting, pausing or resuming); DiskMB the disk
// sizes of live capsules.
type Quota struct {
	Capsules int64 `json:"max_capsules"`
	VCPUs    int64 `json:"max_vcpus"`
	MemoryMB int64 `json:"max_memory_mb"`
	DiskMB   int64 `json:"max_disk_mb"`
}

// QuotaOverride is a team's own limits; nil keeps the platform default.
type QuotaOverride struct {
	Capsules *int32 `json:"max_capsules" db:"max_capsules"`
	VCPUs    *int32 `json:"max_vcpus" db:"max_vcpus"`
	MemoryMB *int32 `json:"max_memory_mb" db:"max_memory_mb"`
	DiskMB   *int32 `json:"max_disk_mb" db:"max_disk_mb"`
}

// Apply is the effective quota: the override where set, else defaults.
func (o QuotaOverride) Apply(defaults Quota) Quota {
	pick := func(v *int32, def int64) int64 {
		if v != nil {
			return int64(*v)
		}
		return def
	}
	return Quota{Capsules: pick(o.Capsules, defaults.Capsules), VCPUs: pick(o.VCPUs, defaults.VCPUs),
		MemoryMB: pick(o.MemoryMB, defaults.MemoryMB), DiskMB: pick(o.DiskMB, defaults.DiskMB)}
}

// Usage is what a team's capsules hold now.
type Usage struct {
	Capsules int64 `json:"capsules" db:"capsules"`
	VCPUs    int64 `json:"vcpus" db:"vcpus"`
	MemoryMB int64 `json:"memory_mb" db:"memory_mb"`
	DiskMB   int64 `json:"disk_mb" db:"disk_mb"`
}

// ErrQuota is wrapped by every QuotaError.
var ErrQuota = errors.New("team quota exceeded")

// QuotaError names the limit a request would pass.
type QuotaError struct {
	What  string // "live capsules", "vCPUs", "MB of memory", "MB of disk"
	Limit int64
	Used  int64
	Asked int64
}

func (e *QuotaError) Error() string {
	return fmt.Sprintf("the team's limit of %d %s would be passed: %d in use, %d more asked", e.Limit, e.What, e.Used, e.Asked)
}

func (e *QuotaError) Unwrap() error { return ErrQuota }

// check returns the first limit that used plus asked would pass.
func (q Quota) check(used, asked Usage) error {
	for _, c := range []struct {
		what               string
		limit, used, asked int64
	}{
		{"live capsules", q.Capsules, used.Capsules, asked.Capsules},
		{"vCPUs", q.VCPUs, used.VCPUs, asked.VCPUs},
		{"MB of memory", q.MemoryMB, used.MemoryMB, asked.MemoryMB},
		{"MB of disk", q.DiskMB, used.DiskMB, asked.DiskMB},
	} {
		if c.limit > 0 && c.asked > 0 && c.used+c.asked > c.limit {
			return &QuotaError{What: c.what, Limit: c.limit, Used: c.used, Asked: c.asked}
		}
	}
	return nil
}

const usageSQL = `SELECT count(*) AS capsules,
	coalesce(sum(vcpus) FILTER (WHERE status IN ('pending', 'starting', 'running', 'pausing', 'resuming')), 0)::bigint AS vcpus,
	coalesce(sum(memory_mb) FILTER (WHERE status IN ('pending', 'starting', 'running', 'pausing', 'resuming')), 0)::bigint AS memory_mb,
	coalesce(sum(coalesce(disk_size_mb, 0)), 0)::bigint AS disk_mb
	FROM sandboxes WHERE team_id = $1 AND status = ANY($2) AND id <> $3`

func usage(ctx context.Context, q pgx.Tx, teamID, except string) (Usage, error) {
	rows, _ := q.Query(ctx, usageSQL, teamID, Live, except)
	return pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Usage])
}

// lockTeam takes the team's row for the transaction: the quota checks of
// one team run one at a time, on every replica.
func lockTeam(ctx context.Context, tx pgx.Tx, teamID string) (QuotaOverride, error) {
	rows, _ := tx.Query(ctx, "SELECT max_capsules, max_vcpus, max_memory_mb, max_disk_mb FROM teams WHERE id = $1 FOR UPDATE", teamID)
	return pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[QuotaOverride])
}

// TeamQuota is a team's override, effective quota and usage.
func (s *Store) TeamQuota(ctx context.Context, teamID string, defaults Quota) (QuotaOverride, Quota, Usage, error) {
	var o QuotaOverride
	var u Usage
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		rows, _ := tx.Query(ctx, "SELECT max_capsules, max_vcpus, max_memory_mb, max_disk_mb FROM teams WHERE id = $1", teamID)
		var err error
		if o, err = pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[QuotaOverride]); err != nil {
			return err
		}
		u, err = usage(ctx, tx, teamID, "")
		return err
	})
	return o, o.Apply(defaults), u, mapErr(err, "team quota")
}

// SetTeamQuota replaces a team's override.
func (s *Store) SetTeamQuota(ctx context.Context, teamID string, o QuotaOverride) error {
	return s.execOne(ctx, "set team quota", `UPDATE teams SET max_capsules = $2, max_vcpus = $3, max_memory_mb = $4, max_disk_mb = $5
		WHERE id = $1 AND deleted_at IS NULL`, teamID, o.Capsules, o.VCPUs, o.MemoryMB, o.DiskMB)
}

// InsertSandboxWithin records a new capsule if its team's quota (the
// override, else defaults) has room for it; a *QuotaError otherwise.
func (s *Store) InsertSandboxWithin(ctx context.Context, sb Sandbox, defaults Quota) (Sandbox, error) {
	var stored Sandbox
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		o, err := lockTeam(ctx, tx, sb.TeamID)
		if err != nil {
			return err
		}
		used, err := usage(ctx, tx, sb.TeamID, "")
		if err != nil {
			return err
		}
		disk := int64(0)
		if sb.DiskSizeMB != nil {
			disk = int64(*sb.DiskSizeMB)
		}
		if err := o.Apply(defaults).check(used, Usage{Capsules: 1, VCPUs: int64(sb.VCPUs), MemoryMB: int64(sb.MemoryMB), DiskMB: disk}); err != nil {
			return err
		}
		stored, err = insertSandbox(ctx, tx, sb, s.seal(ids.Random(20)))
		return err
	})
	if qe := (*QuotaError)(nil); errors.As(err, &qe) {
		return Sandbox{}, qe
	}
	return stored, mapErr(err, "insert capsule")
}

// ResumeWithin moves a paused capsule to resuming if its team's quota has
// room for its vCPUs and memory again.
func (s *Store) ResumeWithin(ctx context.Context, sb Sandbox, defaults Quota) error {
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		o, err := lockTeam(ctx, tx, sb.TeamID)
		if err != nil {
			return err
		}
		used, err := usage(ctx, tx, sb.TeamID, sb.ID)
		if err != nil {
			return err
		}
		if err := o.Apply(defaults).check(used, Usage{VCPUs: int64(sb.VCPUs), MemoryMB: int64(sb.MemoryMB)}); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, "UPDATE sandboxes SET status = 'resuming', last_updated = now() WHERE id = $1 AND status = 'paused'", sb.ID)
		if err == nil && tag.RowsAffected() == 0 {
			return fmt.Errorf("capsule %s is no longer paused: %w", sb.ID, ErrConflict)
		}
		return err
	})
	if qe := (*QuotaError)(nil); errors.As(err, &qe) {
		return qe
	}
	return mapErr(err, "resume capsule")
}
