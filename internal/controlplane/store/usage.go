package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// MetricSample is one resource reading of a running capsule.
type MetricSample struct {
	SandboxID string    `db:"sandbox_id"`
	At        time.Time `db:"at"`
	CPUPct    float64   `db:"cpu_pct"`
	MemBytes  int64     `db:"mem_bytes"`
	DiskBytes int64     `db:"disk_bytes"`
}

// RecordMetrics stores samples (a repeated timestamp is ignored).
func (s *Store) RecordMetrics(ctx context.Context, samples []MetricSample) error {
	if len(samples) == 0 {
		return nil
	}
	b := &pgx.Batch{}
	for _, m := range samples {
		b.Queue(`INSERT INTO sandbox_metrics (sandbox_id, at, cpu_pct, mem_bytes, disk_bytes) VALUES ($1, $2, $3, $4, $5)
			ON CONFLICT DO NOTHING`, m.SandboxID, m.At, m.CPUPct, m.MemBytes, m.DiskBytes)
	}
	return mapErr(s.Pool.SendBatch(ctx, b).Close(), "record metrics")
}

// Metrics returns a capsule's samples since a time, averaged into buckets
// of the given width (0 keeps every sample).
func (s *Store) Metrics(ctx context.Context, sandboxID string, since time.Time, bucket time.Duration) ([]MetricSample, error) {
	var rows pgx.Rows
	if bucket <= 0 {
		rows, _ = s.Pool.Query(ctx, `SELECT sandbox_id, at, cpu_pct, mem_bytes, disk_bytes FROM sandbox_metrics
			WHERE sandbox_id = $1 AND at >= $2 ORDER BY at`, sandboxID, since)
	} else {
		rows, _ = s.Pool.Query(ctx, `SELECT sandbox_id, date_bin($3::interval, at, 'epoch') AS at,
			avg(cpu_pct) AS cpu_pct, avg(mem_bytes)::bigint AS mem_bytes, max(disk_bytes) AS disk_bytes
			FROM sandbox_metrics WHERE sandbox_id = $1 AND at >= $2 GROUP BY 1, 2 ORDER BY 2`, sandboxID, since, bucket.String())
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[MetricSample])
	return out, mapErr(err, "metrics")
}

// Prune drops what is past its retention: metric samples after a day,
// events after a week, expired event tickets.
func (s *Store) Prune(ctx context.Context) error {
	for _, q := range []string{
		"DELETE FROM sandbox_metrics WHERE at < now() - interval '24 hours'",
		"DELETE FROM events WHERE created_at < now() - interval '7 days'",
		"DELETE FROM event_tickets WHERE expires_at < now()",
	} {
		if _, err := s.Pool.Exec(ctx, q); err != nil {
			return mapErr(err, "prune")
		}
	}
	return nil
}

// StatsPoint is a team's concurrent reservation at one moment.
type StatsPoint struct {
	At       time.Time `db:"at"`
	Running  int64     `db:"running"`
	VCPUs    int64     `db:"vcpus"`
	MemoryMB int64     `db:"memory_mb"`
}

// StatsSeries samples a team's running capsules at every step from since,
// and at now, from the run history (exact, not sampled).
func (s *Store) StatsSeries(ctx context.Context, teamID string, since time.Time, step time.Duration) ([]StatsPoint, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT b AS at, count(r.id) AS running,
			coalesce(sum(r.vcpus), 0)::bigint AS vcpus, coalesce(sum(r.memory_mb), 0)::bigint AS memory_mb
		FROM (SELECT generate_series(date_bin($3::interval, $2::timestamptz, 'epoch'), now(), $3::interval) AS b
			UNION SELECT now()) AS moments
		LEFT JOIN sandbox_runs r ON r.team_id = $1 AND r.started_at <= b AND (r.ended_at IS NULL OR r.ended_at > b)
		GROUP BY b ORDER BY b`, teamID, since, step.String())
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[StatsPoint])
	return out, mapErr(err, "stats series")
}

// StatsPeaks is the most a team ran at once since a time. Concurrency
// only rises when a run starts, so the start times are the moments to check.
func (s *Store) StatsPeaks(ctx context.Context, teamID string, since time.Time) (StatsPoint, error) {
	var p StatsPoint
	err := s.Pool.QueryRow(ctx, `WITH moments AS (
			SELECT started_at AS at FROM sandbox_runs WHERE team_id = $1 AND started_at >= $2
			UNION SELECT $2::timestamptz)
		SELECT coalesce(max(running), 0), coalesce(max(vcpus), 0), coalesce(max(memory_mb), 0) FROM (
			SELECT m.at, count(r.id) AS running, coalesce(sum(r.vcpus), 0) AS vcpus, coalesce(sum(r.memory_mb), 0) AS memory_mb
			FROM moments m LEFT JOIN sandbox_runs r ON r.team_id = $1 AND r.started_at <= m.at AND (r.ended_at IS NULL OR r.ended_at > m.at)
			GROUP BY m.at) per_moment`, teamID, since).Scan(&p.Running, &p.VCPUs, &p.MemoryMB)
	return p, mapErr(err, "stats peaks")
}

// DayUsage is a team's consumption on one day (UTC).
type DayUsage struct {
	Day          time.Time `db:"day"`
	CPUMinutes   float64   `db:"cpu_minutes"`
	RAMMBMinutes float64   `db:"ram_mb_minutes"`
}

// UsageByDay sums vCPU-minutes and MB-minutes of running capsules for
// every day from..to (inclusive, "YYYY-MM-DD", UTC), cutting runs at day
// boundaries.
func (s *Store) UsageByDay(ctx context.Context, teamID, from, to string) ([]DayUsage, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT days.d AS day,
			coalesce(sum(r.vcpus * r.overlap), 0)::float8 AS cpu_minutes,
			coalesce(sum(r.memory_mb * r.overlap), 0)::float8 AS ram_mb_minutes
		FROM (SELECT g AT TIME ZONE 'UTC' AS d
			FROM generate_series($2::date::timestamp, $3::date::timestamp, interval '1 day') AS g) AS days
		LEFT JOIN LATERAL (
			SELECT runs.vcpus, runs.memory_mb,
				extract(epoch FROM least(coalesce(runs.ended_at, now()), days.d + interval '24 hours') - greatest(runs.started_at, days.d)) / 60 AS overlap
			FROM sandbox_runs runs
			WHERE runs.team_id = $1 AND runs.started_at < days.d + interval '24 hours' AND coalesce(runs.ended_at, now()) > days.d
		) r ON true
		GROUP BY days.d ORDER BY days.d`, teamID, from, to)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[DayUsage])
	return out, mapErr(err, "usage")
}
