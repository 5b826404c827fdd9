// Package pgtest gives tests a fresh database on a real PostgreSQL.
//
// The server comes from WRENN_TEST_DATABASE_URL (`make test` starts a
// private cluster with scripts/postgres.sh and sets it). Each call creates
// a new database on that server and drops it when the test ends; the
// database the URL names is never touched.
package pgtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
)

// URL returns a connection URL to a new, empty database.
func URL(t testing.TB) string {
	t.Helper()
	server := os.Getenv("WRENN_TEST_DATABASE_URL")
	if server == "" {
		if os.Getenv("WRENN_REQUIRE_DB") == "1" {
			t.Fatal("WRENN_TEST_DATABASE_URL is not set (make test sets it from scripts/postgres.sh)")
		}
		t.Skip("no PostgreSQL for tests: run `scripts/postgres.sh start` and set WRENN_TEST_DATABASE_URL=$(scripts/postgres.sh url), or use make test")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, server)
	if err != nil {
		t.Fatalf("connect to the test PostgreSQL: %v", err)
	}
	defer admin.Close(context.Background())
	name := "wrenn_test_" + ids.Random(8)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, server)
		if err != nil {
			t.Errorf("drop test database: %v", err)
			return
		}
		defer c.Close(context.Background())
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop test database: %v", err)
		}
	})
	u, err := url.Parse(server)
	if err != nil {
		t.Fatalf("WRENN_TEST_DATABASE_URL: %v", err)
	}
	u.Path = "/" + name
	return fmt.Sprint(u)
}
