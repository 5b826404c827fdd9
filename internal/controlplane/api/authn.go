package api

import (
	"crypto/subtle"
	"errors"
	"net/http"
	"strings"

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
		tk, err := s.st.UseEventTicket(ctx, auth.HashToken(t))
		if err != nil || tk.Admin || tk.Scope != r.URL.Path {
			return nil, errf(http.StatusUnauthorized, "unauthorized", "the ticket is unknown, used, expired or for another stream")
		}
		return &principal{TeamID: tk.TeamID, Name: "dashboard session", limitKey: "team:" + tk.TeamID}, nil
	}
	if key := r.Header.Get("X-API-Key"); key != "" {
		if a == user {
			return nil, forbidden("this endpoint needs a user session (JWT), not an API key")
		}
		if !strings.HasPrefix(key, auth.APIKeyPrefix) || len(key) != len(auth.APIKeyPrefix)+32 {
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
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || bearer == "" {
		return nil, errUnauthorized
	}
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
	return &principal{TeamID: claims.TeamID, UserID: u.ID, IsAdmin: u.IsAdmin, Role: m.Role, Email: u.Email, Name: u.Name, limitKey: "user:" + u.ID}, nil
}
