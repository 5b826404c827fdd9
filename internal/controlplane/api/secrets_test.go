package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/seal"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// Whoever reads the database (or a backup) finds no usable secret: the
// JWT signing secret, agents' host tokens and channel credentials are
// sealed with the operator's key; a control plane with another key
// refuses to start rather than serve; a rotation reseals everything,
// values stored in the clear before sealing included.
func TestSecretsAreSealedAtRest(t *testing.T) {
	ctx := context.Background()
	url := pgtest.URL(t)
	c := newCPOn(t, url, []byte("test-secret-0123456789abcdef0123456789"))
	admin := c.signup("admin@example.com")

	const jwtSecret = "the-jwt-signing-secret-0123456789abcdef"
	if got, err := c.st.Setting(ctx, "jwt_secret", jwtSecret); err != nil || got != jwtSecret {
		t.Fatalf("setting: %q %v", got, err)
	}
	hostID, token := c.newHostToken(admin)
	var reg registered
	c.want(c.do("POST", "/v1/hosts/register", creds{}, withToken(token)), 201).json(t, &reg)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: reg.Token}, nil), 204) // read back and opened
	const hook = "https://hooks.slack.com/services/T0000/B0000/the-webhook-secret"
	var ch struct{ ID string }
	c.want(c.do("POST", "/v1/channels", creds{jwt: admin.jwt}, map[string]any{"name": "ops", "provider": "slack",
		"config": map[string]string{"webhook_url": hook}, "events": []string{"capsule.created"}}), 201).json(t, &ch)

	raw := func() []string {
		var settings, tok, config string
		if err := c.st.Pool.QueryRow(ctx, "SELECT value FROM settings WHERE key = 'jwt_secret'").Scan(&settings); err != nil {
			t.Fatal(err)
		}
		if err := c.st.Pool.QueryRow(ctx, "SELECT agent_token FROM hosts WHERE id = $1", hostID).Scan(&tok); err != nil {
			t.Fatal(err)
		}
		if err := c.st.Pool.QueryRow(ctx, "SELECT config::text FROM channels WHERE id = $1", ch.ID).Scan(&config); err != nil {
			t.Fatal(err)
		}
		return []string{settings, tok, config}
	}
	for i, v := range raw() {
		if !strings.Contains(v, "wrenc:v1:") || strings.Contains(v, "the-jwt-signing") || strings.Contains(v, reg.Token) || strings.Contains(v, "the-webhook-secret") {
			t.Fatalf("value %d is in the database in the clear: %q", i, v)
		}
	}

	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	open := func(keys *seal.Keyring) *store.Store {
		st, err := store.Open(ctx, url, 10*time.Second, quiet)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(st.Close)
		st.Secrets = keys
		return st
	}
	// Another key: the start stops, naming what it cannot open.
	wrong, _ := seal.New(seal.Generate())
	if _, err := open(wrong).ResealSecrets(ctx); !errors.Is(err, seal.ErrNoKey) {
		t.Fatalf("a control plane with the wrong key: %v", err)
	}
	// A value stored before sealing existed is sealed at the next start.
	if _, err := c.st.Pool.Exec(ctx, "INSERT INTO settings (key, value) VALUES ('legacy', 'stored in the clear')"); err != nil {
		t.Fatal(err)
	}
	if n, err := c.st.ResealSecrets(ctx); err != nil || n != 1 {
		t.Fatalf("reseal of a clear value: %d %v", n, err)
	}
	// Rotation: the new key with the old one beside it reseals everything...
	next := seal.Generate()
	both, _ := seal.New(next, testEncryptionKey)
	if n, err := open(both).ResealSecrets(ctx); err != nil || n != 4 {
		t.Fatalf("rotation resealed %d values: %v", n, err)
	}
	// ...after which the new key alone reads them, and the old one cannot.
	only, _ := seal.New(next)
	st := open(only)
	if got, err := st.Setting(ctx, "jwt_secret", "ignored"); err != nil || got != jwtSecret {
		t.Fatalf("the JWT secret after rotation: %q %v", got, err)
	}
	if h, err := st.Host(ctx, hostID); err != nil || h.AgentToken == nil || *h.AgentToken != reg.Token {
		t.Fatalf("the host token after rotation: %v", err)
	}
	if chans, err := st.Channels(ctx, admin.teamID); err != nil || len(chans) != 1 || chans[0].Config["webhook_url"] != hook {
		t.Fatalf("the channel after rotation: %+v %v", chans, err)
	}
	retired, _ := seal.New(testEncryptionKey)
	if _, err := open(retired).ResealSecrets(ctx); !errors.Is(err, seal.ErrNoKey) {
		t.Fatalf("a retired key still opens the secrets: %v", err)
	}
}
