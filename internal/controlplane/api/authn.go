package api

import (
	"context"
	"crypto/subtle"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// principal is the authenticated caller.
type principal struct {
	TeamID  string
	UserID  string // "" for API keys and hosts
	KeyID   string // the API key used, if any
	HostID  string // host agents
	IsAdmin bool   // platform admin (users only)
	Role    string // role in TeamID (users only)
	Email   string
	Name    string
	// A user's session: the epoch and membership key its JWT carries.
	Epoch      int32
	Membership string
	// Platform: a platform admin acting for the platform team (no
	// membership: the admin flag is what lets them in).
	Platform bool

	limitKey string
}

// actor describes the principal for the audit log.
func (p *principal) actor() (typ, id string) {
	switch {
	case p == nil:
		return "system", "anonymous"
	case p.HostID != "":
		return "host", p.HostID
	case p.KeyID != "":
		return "api_key", p.KeyID
	default:
		return "user", p.UserID
	}
}

// authenticate resolves the caller's credentials for a route.
func (s *Server) authenticate(r *http.Request, a access) (*principal, error) {
	ctx := r.Context()
	switch a {
	case public:
		return nil, nil
	case host:
		token := r.Header.Get("X-Host-Token")
		if token == "" {
			return nil, errUnauthorized
		}
		claims, err := s.signer.ParseHost(token)
		if err != nil {
			return nil, errUnauthorized
		}
		h, err := s.st.Host(ctx, claims.Subject)
		if err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return nil, errUnauthorized // deleted hosts lose access at once
			}
			return nil, err
		}
		// Only the host's current token works: a refresh retires the old one.
		if h.AgentToken == nil || subtle.ConstantTimeCompare([]byte(*h.AgentToken), []byte(token)) != 1 {
			return nil, errUnauthorized
		}
		return &principal{HostID: h.ID, limitKey: "host:" + h.ID}, nil
	}
	// Browsers cannot put headers on a WebSocket: a capsule's stream may
	// be opened with a single-use ticket from POST /v1/events/token,
	// issued for exactly that stream (its path), instead.
	if t := r.URL.Query().Get("ticket"); t != "" && a == team && r.Header.Get("X-API-Key") == "" && r.Header.Get("Authorization") == "" &&
		strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		return s.useTicket(ctx, t, r.URL.Path, false)
	}
	if key := r.Header.Get("X-API-Key"); key != "" {
		if a == user {
			return nil, forbidden("this endpoint needs a user session (JWT), not an API key")
		}
		return s.keyPrincipal(ctx, key)
	}
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || bearer == "" {
		return nil, errUnauthorized
	}
	return s.userPrincipal(ctx, bearer)
}

// keyPrincipal is the team an API key acts for, while its creator may.
func (s *Server) keyPrincipal(ctx context.Context, key string) (*principal, error) {
	if !auth.WellFormedAPIKey(key) {
		return nil, errUnauthorized
	}
	k, err := s.st.APIKeyByHash(ctx, auth.HashToken(key))
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, errUnauthorized
		}
		return nil, err
	}
	if !k.CreatorActive {
		// Checked on every request: deactivation suspends a user's keys at once.
		return nil, errf(http.StatusUnauthorized, "unauthorized", "this API key no longer works: the user who made it left the team or is deactivated")
	}
	return &principal{TeamID: k.TeamID, KeyID: k.ID, Name: k.Name, limitKey: "key:" + k.ID}, nil
}

// userPrincipal is the user and team a JWT names, while the session and
// the membership it was issued for stand.
func (s *Server) userPrincipal(ctx context.Context, bearer string) (*principal, error) {
	claims, err := s.signer.ParseUser(bearer)
	if err != nil {
		return nil, errUnauthorized
	}
	// The token names a team; membership and account state are checked
	// on every request, so removal from a team takes effect at once.
	u, m, err := s.st.UserInTeam(ctx, claims.Subject, claims.TeamID)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, errUnauthorized
		}
		return nil, err
	}
	if u.Status != "active" {
		return nil, errUnauthorized
	}
	if claims.Epoch != u.SessionEpoch {
		return nil, errf(http.StatusUnauthorized, "session_ended", "this session ended (the password was changed or reset, or the account was deactivated); log in again")
	}
	// A token of an earlier membership (the user was removed, perhaps
	// added back since) ended with it.
	if m.Role == "" || m.Key != claims.Membership {
		return nil, errf(http.StatusUnauthorized, "unauthorized", "you are no longer a member of this token's team; log in again")
	}
	return &principal{TeamID: claims.TeamID, UserID: u.ID, IsAdmin: u.IsAdmin, Role: m.Role, Email: u.Email, Name: u.Name,
		Epoch: claims.Epoch, Membership: claims.Membership, limitKey: "user:" + u.ID}, nil
}

// useTicket consumes a ticket for the stream at path: one issued for it,
// on behalf of a credential that still stands.
func (s *Server) useTicket(ctx context.Context, ticket, path string, admin bool) (*principal, error) {
	refused := errf(http.StatusUnauthorized, "unauthorized", "the ticket is unknown, used, expired or for another stream")
	tk, err := s.st.UseEventTicket(ctx, auth.HashToken(ticket))
	if errors.Is(err, store.ErrNotFound) || err == nil && (tk.Admin != admin || tk.Scope != path) {
		return nil, refused
	}
	if err != nil {
		return nil, err
	}
	p := &principal{TeamID: tk.TeamID, UserID: tk.UserID, KeyID: tk.KeyID, Epoch: tk.Epoch, Membership: tk.Membership,
		Name: "dashboard session", limitKey: "team:" + tk.TeamID}
	if ok, err := s.stillValid(ctx, p); err != nil || !ok {
		if err != nil {
			return nil, err
		}
		return nil, errf(http.StatusUnauthorized, "session_ended", "the session or key this ticket was issued to has ended")
	}
	return p, nil
}

// whileValid gives a long request (a stream) a context that ends when the
// credential p came with ends: the stream stops within Limits.Recheck of
// a password change, a removal from the team, a deactivation or a key's
// revocation. stop releases it.
func (s *Server) whileValid(r *http.Request, p *principal) (*http.Request, func()) {
	ctx, cancel := context.WithCancel(r.Context())
	if p == nil || p.KeyID == "" && p.UserID == "" {
		return r.WithContext(ctx), cancel
	}
	go func() {
		t := time.NewTicker(s.cfg.Limits.Recheck)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if ok, err := s.stillValid(ctx, p); err == nil && !ok {
				s.log.Info("ending a stream: the session or key it was opened with ended", "path", r.URL.Path, "team", p.TeamID)
				cancel()
				return
			}
		}
	}()
	return r.WithContext(ctx), cancel
}

// stillValid reports whether the credential p came with still stands: an
// API key whose creator is an active member, or a user session whose
// epoch and membership are current. Streams check it while they run.
func (s *Server) stillValid(ctx context.Context, p *principal) (bool, error) {
	switch {
	case p.KeyID != "":
		k, err := s.st.APIKeyByID(ctx, p.KeyID)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		return err == nil && k.CreatorActive, err
	case p.UserID != "" && p.TeamID != "" && !p.Platform:
		u, m, err := s.st.UserInTeam(ctx, p.UserID, p.TeamID)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		return u.Status == "active" && u.SessionEpoch == p.Epoch && m.Role != "" && m.Key == p.Membership, nil
	case p.UserID != "": // an admin ticket or platform route: the account and its session
		u, err := s.st.UserByID(ctx, p.UserID)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		return err == nil && u.Status == "active" && u.IsAdmin && u.SessionEpoch == p.Epoch, err
	}
	return true, nil
}
