// Package store is the control plane's only access to PostgreSQL: every
// query is written here by hand, and the schema is migrated on Open.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"

	"github.com/wrenn/wrenn/db/migrations"
	"github.com/wrenn/wrenn/internal/controlplane/seal"
)

var (
	// ErrNotFound means no row matched (or it belongs to another team).
	ErrNotFound = errors.New("not found")
	// ErrConflict means a unique constraint or a state check refused the write.
	ErrConflict = errors.New("conflict")
	// ErrInvalid means PostgreSQL refused a value (a NUL byte in text, a
	// number out of range): bad input that got past validation.
	ErrInvalid = errors.New("invalid value")
	// ErrUnavailable means PostgreSQL could not be reached or dropped the
	// connection (a restart, a failover): the request may be retried.
	ErrUnavailable = errors.New("database unavailable")
)

// unreachable reports whether err is the database being down or going
// away rather than a problem with the query.
func unreachable(err error) bool {
	var ce *pgconn.ConnectError
	var oe *net.OpError
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &ce), errors.As(err, &oe), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return true
	case errors.As(err, &pe):
		// connection exceptions, and the server shutting down or starting up
		return strings.HasPrefix(pe.Code, "08") || pe.Code == "57P01" || pe.Code == "57P02" || pe.Code == "57P03"
	}
	return pgconn.SafeToRetry(err) || strings.Contains(err.Error(), "conn closed")
}

// Store wraps a connection pool.
type Store struct {
	Pool *pgxpool.Pool
	// Secrets, when set, seals the secrets the store keeps (see secrets.go).
	Secrets *seal.Keyring
	log     *slog.Logger
}

// Open connects, waits up to wait for the database to answer, and applies
// every pending migration.
func Open(ctx context.Context, url string, wait time.Duration, log *slog.Logger) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse DATABASE_URL: %w", err)
	}
	if cfg.MaxConns < 20 {
		cfg.MaxConns = 20
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	deadline := time.Now().Add(wait)
	for {
		err = pool.Ping(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			pool.Close()
			return nil, fmt.Errorf("PostgreSQL at %s:%d does not answer: %w", cfg.ConnConfig.Host, cfg.ConnConfig.Port, err)
		}
		log.Info("waiting for PostgreSQL", "err", err)
		select {
		case <-ctx.Done():
			pool.Close()
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
	s := &Store{Pool: pool, log: log}
	if err := s.Migrate(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return s, nil
}

// Close releases the pool.
func (s *Store) Close() { s.Pool.Close() }

// migrationLock serialises migrations between replicas starting together.
const migrationLock = 0x77726e6e00000001

// Migrate applies pending migrations under an advisory lock.
func (s *Store) Migrate(ctx context.Context) error {
	db := stdlib.OpenDBFromPool(s.Pool)
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock($1)", int64(migrationLock)); err != nil {
		return fmt.Errorf("migrate: lock: %w", err)
	}
	defer func() {
		_, _ = conn.ExecContext(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", int64(migrationLock))
	}()
	p, err := newMigrator(db)
	if err != nil {
		return err
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	for _, r := range results {
		s.log.Info("applied migration", "version", r.Source.Version, "file", r.Source.Path, "took", r.Duration.Round(time.Millisecond))
	}
	return nil
}

func newMigrator(db *sql.DB) (*goose.Provider, error) {
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS)
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	return p, nil
}

// MigrateDown undoes every migration (tests and `wrenn-cp migrate down`).
func MigrateDown(ctx context.Context, db *sql.DB) error {
	p, err := newMigrator(db)
	if err != nil {
		return err
	}
	_, err = p.DownTo(ctx, 0)
	return err
}

// MigrationVersion is the schema version the database is at.
func MigrationVersion(ctx context.Context, db *sql.DB) (int64, error) {
	p, err := newMigrator(db)
	if err != nil {
		return 0, err
	}
	return p.GetDBVersion(ctx)
}

// inTx runs fn in a transaction, committing when it returns nil.
func (s *Store) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, s.Pool, fn)
}

// mapErr turns "no rows" and unique violations into the package's errors.
func mapErr(err error, what string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%s: %w", what, ErrNotFound)
	}
	if unreachable(err) {
		return fmt.Errorf("%s: %w: %v", what, ErrUnavailable, err)
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case pe.Code == "23505":
			return fmt.Errorf("%s: %w", what, ErrConflict)
		case pe.Code == "22021" || pe.Code == "22P05" || pe.Code == "22P02" || pe.Code == "22003" || pe.Code == "22001":
			// invalid byte sequence, untranslatable character, bad text
			// representation, numeric out of range, string too long
			return fmt.Errorf("%s: %w: %s", what, ErrInvalid, pe.Message)
		}
	}
	return fmt.Errorf("%s: %w", what, err)
}

// TryLock takes a transaction-scoped advisory lock for one background job
// and runs fn while holding it. It returns false without running fn when
// another replica holds the lock, so two replicas never do the same job.
func (s *Store) TryLock(ctx context.Context, key int64, fn func(ctx context.Context) error) (bool, error) {
	conn, err := s.Pool.Acquire(ctx)
	if err != nil {
		return false, fmt.Errorf("lock %x: %w", key, err)
	}
	defer conn.Release()
	var got bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", key).Scan(&got); err != nil {
		return false, fmt.Errorf("lock %x: %w", key, err)
	}
	if !got {
		return false, nil
	}
	defer func() { _, _ = conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", key) }()
	return true, fn(ctx)
}

// Setting returns the value under key, storing def first if the key is
// new. Concurrent first calls agree on one value.
func (s *Store) Setting(ctx context.Context, key, def string) (string, error) {
	if _, err := s.Pool.Exec(ctx, "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", key, s.seal(def)); err != nil {
		return "", mapErr(err, "setting "+key)
	}
	var v string
	err := s.Pool.QueryRow(ctx, "SELECT value FROM settings WHERE key = $1", key).Scan(&v)
	if err == nil {
		v, err = s.unseal(v)
	}
	return v, mapErr(err, "setting "+key)
}
