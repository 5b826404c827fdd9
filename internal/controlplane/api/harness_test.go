package api

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/notify"
	"github.com/wrenn/wrenn/internal/controlplane/seal"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// testEncryptionKey seals the test control planes' secrets.
var testEncryptionKey = seal.Generate()

// cp is one control plane on a fresh database, served over real HTTP.
type cp struct {
	t   *testing.T
	st  *store.Store
	srv *Server
	url string

	hostLocked bool              // this test holds the host lock (agents change host networking)
	agentDirs  map[string]string // host ID -> its test agent's WRENN_DIR
}

func newCP(t *testing.T) *cp {
	t.Helper()
	return newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"))
}

// newCPOn starts a control plane on dbURL; configure adjusts its Config.
func newCPOn(t *testing.T, dbURL string, secret []byte, configure ...func(*Config)) *cp {
	t.Helper()
	level := slog.LevelWarn
	if os.Getenv("WRENN_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	st, err := store.Open(context.Background(), dbURL, 10*time.Second, log)
	if err != nil {
		t.Fatal(err)
	}
	if st.Secrets, err = seal.New(testEncryptionKey); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Store: st, Signer: &auth.Signer{Secret: secret}, Agents: &agentclient.Pool{}, Log: log, RatePerSecond: -1, SignupsPerHour: -1,
		NotifyClient: notify.NewClient(true)} // test receivers listen on loopback
	for _, f := range configure {
		f(&cfg)
	}
	srv := New(cfg)
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		hs.Close()
		srv.Close()
		st.Close()
	})
	return &cp{t: t, st: st, srv: srv, url: hs.URL}
}

// creds is how a test request authenticates.
type creds struct {
	jwt, key, hostToken string
}

type response struct {
	status int
	body   []byte
	header http.Header
}

func (r response) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

// errorCode checks the error shape and returns its code.
func (r response) errorCode(t *testing.T) string {
	t.Helper()
	var e struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(r.body, &e); err != nil || e.Error.Code == "" || e.Error.Message == "" {
		t.Fatalf("status %d: body is not an error object: %s", r.status, r.body)
	}
	return e.Error.Code
}

func (c *cp) do(method, path string, cr creds, body any) response {
	c.t.Helper()
	var data []byte
	switch b := body.(type) {
	case nil:
	case string:
		data = []byte(b)
	case []byte:
		data = b
	default:
		data, _ = json.Marshal(b)
	}
	contentType := ""
	if body != nil {
		contentType = "application/json"
	}
	return c.doRaw(method, path, cr, contentType, data)
}

// doRaw sends a body of any type ("" with none).
func (c *cp) doRaw(method, path string, cr creds, contentType string, body []byte) response {
	c.t.Helper()
	var rd io.Reader
	if contentType != "" {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, c.url+path, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if cr.jwt != "" {
		req.Header.Set("Authorization", "Bearer "+cr.jwt)
	}
	if cr.key != "" {
		req.Header.Set("X-API-Key", cr.key)
	}
	if cr.hostToken != "" {
		req.Header.Set("X-Host-Token", cr.hostToken)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, body: data, header: resp.Header}
}

func (c *cp) want(r response, status int) response {
	c.t.Helper()
	if r.status != status {
		c.t.Fatalf("status %d, want %d: %s", r.status, status, r.body)
	}
	return r
}

// account signs up and logs in; it returns the JWT, user ID and team ID.
type account struct {
	jwt, userID, teamID, email string
}

func (c *cp) signup(email string) account {
	c.t.Helper()
	c.want(c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": email, "password": "correct horse", "name": "T"}), http.StatusCreated)
	var a struct {
		Token  string `json:"token"`
		UserID string `json:"user_id"`
		TeamID string `json:"team_id"`
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": email, "password": "correct horse"}), http.StatusOK).json(c.t, &a)
	return account{jwt: a.Token, userID: a.UserID, teamID: a.TeamID, email: email}
}

func (c *cp) apiKey(a account) string {
	c.t.Helper()
	var k struct {
		Key string `json:"key"`
	}
	c.want(c.do("POST", "/v1/api-keys", creds{jwt: a.jwt}, map[string]string{"name": "test"}), http.StatusCreated).json(c.t, &k)
	return k.Key
}
