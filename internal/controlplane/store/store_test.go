package store_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"

	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

func open(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(context.Background(), pgtest.URL(t), 10*time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// The schema goes up, all the way down, and up again on a real server.
func TestMigrationsUpDownUp(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	db := stdlib.OpenDBFromPool(s.Pool)
	defer db.Close()
	v, err := store.MigrationVersion(ctx, db)
	if err != nil || v < 1 {
		t.Fatalf("version after up = %d, %v", v, err)
	}
	if err := store.MigrateDown(ctx, db); err != nil {
		t.Fatal(err)
	}
	var tables int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name <> 'goose_db_version'").Scan(&tables); err != nil {
		t.Fatal(err)
	}
	if tables != 0 {
		t.Fatalf("%d tables left after migrating down", tables)
	}
	if err := s.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TemplateByName(ctx, "team-x", "minimal"); err != nil {
		t.Fatalf("the minimal template is not seeded again: %v", err)
	}
}

// Two replicas starting at once both succeed and migrate once.
func TestConcurrentMigrations(t *testing.T) {
	url := pgtest.URL(t)
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			s, err := store.Open(context.Background(), url, 10*time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestFirstUserIsAdminAndEmailsAreUnique(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	a, err := s.CreateUser(ctx, store.User{ID: "usr-a", Email: "A@example.com", PasswordHash: "x", Status: "active"}, store.Team{ID: "team-a", Name: "A", Slug: "a"}, false)
	if err != nil || !a.IsAdmin {
		t.Fatalf("first user admin=%v err=%v", a.IsAdmin, err)
	}
	b, err := s.CreateUser(ctx, store.User{ID: "usr-b", Email: "b@example.com", PasswordHash: "x", Status: "active"}, store.Team{ID: "team-b", Name: "B", Slug: "b"}, false)
	if err != nil || b.IsAdmin {
		t.Fatalf("second user admin=%v err=%v", b.IsAdmin, err)
	}
	_, err = s.CreateUser(ctx, store.User{ID: "usr-c", Email: "a@EXAMPLE.com", PasswordHash: "x", Status: "active"}, store.Team{ID: "team-c", Name: "C", Slug: "c"}, false)
	if !errors.Is(err, store.ErrConflict) {
		t.Fatalf("duplicate email (other case): %v", err)
	}
	if _, err := s.Team(ctx, "team-c"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a refused signup left its team behind: %v", err)
	}
	if err := s.SetAdmin(ctx, "usr-a", false); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("removing the last admin: %v", err)
	}
}

// Two replicas never run the same job at once.
func TestTryLockIsExclusive(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	inside := make(chan struct{})
	release := make(chan struct{})
	go func() {
		_, _ = s.TryLock(ctx, 42, func(context.Context) error {
			close(inside)
			<-release
			return nil
		})
	}()
	<-inside
	ran, err := s.TryLock(ctx, 42, func(context.Context) error { return nil })
	if err != nil || ran {
		t.Fatalf("second holder ran=%v err=%v", ran, err)
	}
	close(release)
	time.Sleep(100 * time.Millisecond)
	ran, err = s.TryLock(ctx, 42, func(context.Context) error { return nil })
	if err != nil || !ran {
		t.Fatalf("after release ran=%v err=%v", ran, err)
	}
}

// A capsule past its timeout is stopped in one statement, and one whose
// deadline moved (a ping, setTimeout) is left running.
func TestStopExpiredOnlyStopsWhatIsStillExpired(t *testing.T) {
	for name, move := range map[string]struct {
		do func(*store.Store, context.Context, string) (bool, error)
		to string
	}{"destroy": {(*store.Store).StopExpired, "stopping"}, "pause": {(*store.Store).PauseExpired, "pausing"}} {
		t.Run(name, func(t *testing.T) { testExpiredMove(t, move.do, move.to) })
	}
}

// testExpiredMove: a timeout's move happens only to a capsule still past
// its deadline, once.
func testExpiredMove(t *testing.T, move func(*store.Store, context.Context, string) (bool, error), to string) {
	ctx := context.Background()
	s := open(t)
	if _, err := s.CreateUser(ctx, store.User{ID: "usr-x", Email: "x@example.com", PasswordHash: "x", Status: "active"}, store.Team{ID: "team-x", Name: "X", Slug: "x"}, false); err != nil {
		t.Fatal(err)
	}
	past, future := time.Now().Add(-time.Minute), time.Now().Add(time.Hour)
	for id, end := range map[string]time.Time{"sb-expired0000000001": past, "sb-extended000000001": future} {
		if _, err := s.InsertSandbox(ctx, store.Sandbox{ID: id, TeamID: "team-x", Template: "minimal", Status: "starting", VCPUs: 1, MemoryMB: 256, EndAt: &end}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Transition(ctx, id, []string{"starting"}, "running", map[string]any{"started_at": store.Now}); err != nil {
			t.Fatal(err)
		}
	}
	if stopped, err := move(s, ctx, "sb-expired0000000001"); err != nil || !stopped {
		t.Fatalf("the expired capsule: stopped %v, %v", stopped, err)
	}
	if stopped, err := move(s, ctx, "sb-extended000000001"); err != nil || stopped {
		t.Fatalf("the extended capsule: stopped %v, %v", stopped, err)
	}
	for id, want := range map[string]string{"sb-expired0000000001": to, "sb-extended000000001": "running"} {
		if sb, err := s.Sandbox(ctx, "", id); err != nil || sb.Status != want {
			t.Fatalf("%s is %q (%v), want %s", id, sb.Status, err, want)
		}
	}
	if stopped, err := move(s, ctx, "sb-expired0000000001"); err != nil || stopped {
		t.Fatalf("a capsule already stopping was stopped again: %v, %v", stopped, err)
	}
}
