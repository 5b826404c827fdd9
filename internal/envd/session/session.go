// Package session holds what envd knows about the sandbox it serves: the
// defaults set through POST /init, and the user each request acts as.
package session

import (
	"context"
	"crypto/subtle"
	"maps"
	"strconv"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/envd/identity"
)

// Defaults are the sandbox-wide settings that /init changes. The zero value
// is usable: no token, no extra variables, no default user or directory.
type Defaults struct {
	mu      sync.RWMutex
	env     map[string]string
	token   string
	user    string
	workdir string
}

// Update describes a change made by /init. Nil fields are left alone.
type Update struct {
	Env     map[string]string
	Token   *string
	User    *string
	Workdir *string
}

// Apply merges an update: env vars are added to (not replaced), the rest
// overwrite.
func (d *Defaults) Apply(u Update) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(u.Env) > 0 {
		if d.env == nil {
			d.env = map[string]string{}
		}
		maps.Copy(d.env, u.Env)
	}
	if u.Token != nil {
		d.token = *u.Token
	}
	if u.User != nil {
		d.user = *u.User
	}
	if u.Workdir != nil {
		d.workdir = *u.Workdir
	}
}

// Env returns a copy of the variables every new process receives.
func (d *Defaults) Env() map[string]string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return maps.Clone(d.env)
}

// User is the account used when a request names none ("" if unset).
func (d *Defaults) User() string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.user
}

// Workdir is the working directory for processes that name none.
func (d *Defaults) Workdir() string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.workdir
}

// TokenSet reports whether requests must carry an access token.
func (d *Defaults) TokenSet() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.token != ""
}

// TokenMatches compares a presented token in constant time. With no token
// configured every request matches.
func (d *Defaults) TokenMatches(presented string) bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.token == "" {
		return true
	}
	return subtle.ConstantTimeCompare([]byte(presented), []byte(d.token)) == 1
}

// CheckWithToken runs check with the configured access token (for
// signatures made with it); with no token configured it passes.
func (d *Defaults) CheckWithToken(check func(token string) error) error {
	d.mu.RLock()
	token := d.token
	d.mu.RUnlock()
	if token == "" {
		return nil
	}
	return check(token)
}

type userKey struct{}

// WithUser records the user a request acts as.
func WithUser(ctx context.Context, u *identity.User) context.Context {
	return context.WithValue(ctx, userKey{}, u)
}

// UserFrom returns the user the request acts as. The HTTP middleware sets
// it for every request, so a missing user is a programming error.
func UserFrom(ctx context.Context) *identity.User {
	u, ok := ctx.Value(userKey{}).(*identity.User)
	if !ok {
		panic("session: request has no user; is the auth middleware installed?")
	}
	return u
}

// KeepaliveHeader lets clients choose how often idle streams send a
// keepalive event, in whole seconds.
const KeepaliveHeader = "Keepalive-Ping-Interval"

// KeepaliveInterval reads the client's keepalive interval, defaulting to
// 30 s and clamped to 1 s .. 10 min.
func KeepaliveInterval(h interface{ Get(string) string }) time.Duration {
	secs, err := strconv.Atoi(h.Get(KeepaliveHeader))
	switch {
	case err != nil || secs <= 0:
		return 30 * time.Second
	case secs > 600:
		return 10 * time.Minute
	default:
		return time.Duration(secs) * time.Second
	}
}
