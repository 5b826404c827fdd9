// Package registration is the agent's side of the host flow: it trades a
// one-time registration token for a host JWT and refresh token, keeps
// them in WRENN_DIR, sends heartbeats and refreshes the JWT.
package registration

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// Specs is what the agent reports about its machine.
type Specs struct {
	Arch     string `json:"arch"`
	CPUCores int32  `json:"cpu_cores"`
	MemoryMB int32  `json:"memory_mb"`
	DiskGB   int32  `json:"disk_gb"`
	Address  string `json:"address"`
	VMM      string `json:"vmm"`
	Version  string `json:"version"`
}

// Files under WRENN_DIR.
const (
	TokenFile       = "host-token" // the host JWT: what the control plane presents to this agent
	CredentialsFile = "host.json"  // host ID, control-plane URL and refresh token
)

// Credentials are a registered host's identity. The token is what the
// control plane presents on every RPC; after a refresh the previous token
// stays accepted until the next one, so calls in flight do not fail.
type Credentials struct {
	HostID       string `json:"host_id"`
	CPURL        string `json:"cp_url"`
	RefreshToken string `json:"refresh_token"`
	// ManagedTLS: the control plane signs this agent's TLS certificate.
	ManagedTLS bool `json:"managed_tls,omitempty"`

	dir      string
	mu       sync.RWMutex
	token    string
	previous string
	cert     atomic.Pointer[tls.Certificate]
}

// Tokens returns the current and the previous host token.
func (c *Credentials) Tokens() (string, string) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.token, c.previous
}

var client = &http.Client{Timeout: 30 * time.Second}

// apiError is the control plane's error body.
type apiError struct {
	Status int
	Code   string `json:"code"`
	Msg    string `json:"message"`
}

func (e *apiError) Error() string {
	return fmt.Sprintf("control plane answered %d %s: %s", e.Status, e.Code, e.Msg)
}

func post(ctx context.Context, url string, header http.Header, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("reach the control plane: %w", err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode >= 300 {
		var e struct {
			Error apiError `json:"error"`
		}
		_ = json.Unmarshal(data, &e)
		e.Error.Status = resp.StatusCode
		return &e.Error
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("control plane answer: %w", err)
		}
	}
	return nil
}

type tokenResponse struct {
	Host struct {
		ID string `json:"id"`
	} `json:"host"`
	Token        string `json:"token"`
	RefreshToken string `json:"refresh_token"`
	Certificate  string `json:"certificate"`
	CACert       string `json:"ca_certificate"`
	// Protocol is the agent RPC service the control plane calls.
	Protocol string `json:"protocol"`
}

// Register trades a registration token for credentials and saves them.
// With managedTLS it also asks the control plane to certify a key made
// here (see ServerTLS).
func Register(ctx context.Context, dir, cpURL, token string, specs Specs, managedTLS bool) (*Credentials, error) {
	cpURL = strings.TrimRight(cpURL, "/")
	// The agent RPC is named for this project: a control plane that calls
	// another (upstream Wrenn's, whose service has the same name in
	// another package with other field numbers) would garble every call.
	in := struct {
		Token    string `json:"token"`
		CSR      string `json:"csr,omitempty"`
		Protocol string `json:"protocol"`
		Specs
	}{Token: token, Protocol: hostagentv2connect.HostAgentServiceName, Specs: specs}
	if managedTLS {
		csr, err := certRequest(dir)
		if err != nil {
			return nil, err
		}
		in.CSR = csr
	}
	var out tokenResponse
	if err := post(ctx, cpURL+"/v1/hosts/register", nil, in, &out); err != nil {
		return nil, fmt.Errorf("register host: %w", err)
	}
	if out.Protocol != hostagentv2connect.HostAgentServiceName {
		return nil, fmt.Errorf("register host: the control plane at %s calls agent protocol %q, this agent serves %q "+
			"(an upstream Wrenn control plane, or another release of wrenn-cp): run a wrenn-cp of this agent's release", cpURL, out.Protocol, hostagentv2connect.HostAgentServiceName)
	}
	c := &Credentials{HostID: out.Host.ID, CPURL: cpURL, RefreshToken: out.RefreshToken, ManagedTLS: managedTLS, dir: dir, token: out.Token}
	if managedTLS {
		if err := c.saveCertificate(out.Certificate, out.CACert); err != nil {
			return nil, fmt.Errorf("register host: %w", err)
		}
	}
	if err := c.save(); err != nil {
		return nil, err
	}
	return c, nil
}

// Load reads saved credentials; os.ErrNotExist if the host never registered.
func Load(dir string) (*Credentials, error) {
	data, err := os.ReadFile(filepath.Join(dir, CredentialsFile))
	if err != nil {
		return nil, err
	}
	var c Credentials
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", CredentialsFile, err)
	}
	tok, err := os.ReadFile(filepath.Join(dir, TokenFile))
	if err != nil {
		return nil, err
	}
	c.dir, c.token = dir, strings.TrimSpace(string(tok))
	if c.HostID == "" || c.CPURL == "" || c.token == "" {
		return nil, fmt.Errorf("%s is incomplete; register the host again", CredentialsFile)
	}
	return &c, nil
}

// save writes both files atomically, readable by root only.
func (c *Credentials) save() error {
	c.mu.RLock()
	token := c.token
	data, err := json.MarshalIndent(c, "", "  ")
	c.mu.RUnlock()
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(c.dir, CredentialsFile), data); err != nil {
		return err
	}
	return writeFile(filepath.Join(c.dir, TokenFile), []byte(token+"\n"))
}

func writeFile(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("save credentials: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save credentials: %w", err)
	}
	return nil
}

// Refresh rotates the JWT and the refresh token, and renews a managed
// TLS certificate that is due.
func (c *Credentials) Refresh(ctx context.Context) error {
	in := map[string]string{"refresh_token": c.RefreshToken}
	renew := c.certificateDue()
	if renew {
		csr, err := certRequest(c.dir)
		if err != nil {
			return err
		}
		in["csr"] = csr
	}
	var out tokenResponse
	if err := post(ctx, c.CPURL+"/v1/hosts/auth/refresh", nil, in, &out); err != nil {
		return fmt.Errorf("refresh host token: %w", err)
	}
	c.mu.Lock()
	c.previous, c.token, c.RefreshToken = c.token, out.Token, out.RefreshToken
	c.mu.Unlock()
	if err := c.save(); err != nil {
		return err
	}
	if renew {
		if err := c.saveCertificate(out.Certificate, out.CACert); err != nil {
			return fmt.Errorf("renew TLS certificate: %w", err)
		}
	}
	return nil
}

// expiresWithin reports whether the JWT expires within d (unverified
// parse: the agent only needs the date the control plane wrote).
func (c *Credentials) expiresWithin(d time.Duration) bool {
	tok, _ := c.Tokens()
	claims := jwt.RegisteredClaims{}
	if _, _, err := jwt.NewParser().ParseUnverified(tok, &claims); err != nil || claims.ExpiresAt == nil {
		return true
	}
	return time.Until(claims.ExpiresAt.Time) < d
}

// Heartbeat sends one heartbeat, refreshing the token first when it is
// close to expiry or after the control plane refuses it.
func (c *Credentials) Heartbeat(ctx context.Context) error {
	if c.expiresWithin(24*time.Hour) || c.certificateDue() {
		if err := c.Refresh(ctx); err != nil {
			return err
		}
	}
	send := func() error {
		tok, _ := c.Tokens()
		return post(ctx, c.CPURL+"/v1/hosts/"+c.HostID+"/heartbeat", http.Header{"X-Host-Token": {tok}}, struct{}{}, nil)
	}
	err := send()
	var ae *apiError
	if errors.As(err, &ae) && ae.Status == http.StatusUnauthorized {
		if rerr := c.Refresh(ctx); rerr != nil {
			return fmt.Errorf("heartbeat refused and %w", rerr)
		}
		err = send()
	}
	return err
}

// Run sends heartbeats every interval until ctx ends, logging failures
// (the control plane marks the host unreachable after a few misses).
func (c *Credentials) Run(ctx context.Context, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	failing := false
	for {
		err := c.Heartbeat(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("heartbeat failed", "host", c.HostID, "control_plane", c.CPURL, "err", err)
			failing = true
		case err == nil && failing:
			log.Info("heartbeats reach the control plane again", "host", c.HostID)
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
