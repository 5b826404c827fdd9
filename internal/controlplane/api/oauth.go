package api

import (
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/oauthlogin"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Sign-in through OAuth providers, as upstream Wrenn does it: the browser
// goes to /auth/oauth/<provider> (?intent=signup to make an account), the
// provider sends it to the callback, and the callback hands the dashboard
// a session in short-lived cookies at /auth/<provider>/callback (or an
// ?error=<code> there). A signed-in user links a provider with
// GET /v1/me/providers/<provider>/connect.

const (
	oauthStateCookie = "wrenn_oauth_state"
	oauthStateTTL    = 10 * time.Minute
)

// The cookies the dashboard's callback page reads (as upstream's does).
var oauthSessionCookies = []string{"wrenn_oauth_token", "wrenn_oauth_user_id", "wrenn_oauth_team_id", "wrenn_oauth_email", "wrenn_oauth_name"}

func (s *Server) oauthProvider(r *http.Request) (oauthlogin.Provider, error) {
	p, ok := s.cfg.OAuth[r.PathValue("provider")]
	if !ok {
		return nil, errf(http.StatusNotFound, "provider_not_found", "sign-in with %q is not configured on this control plane", r.PathValue("provider"))
	}
	return p, nil
}

// oauthKey signs sign-in states; it is derived from the JWT secret, so
// every replica shares it and it signs nothing else.
func (s *Server) oauthKey() []byte {
	h := hmac.New(sha256.New, s.signer.Secret)
	h.Write([]byte("wrenn oauth state"))
	return h.Sum(nil)
}

// secureCookies: the dashboard is served over HTTPS.
func (s *Server) secureCookies(r *http.Request) bool {
	return r.TLS != nil || strings.HasPrefix(s.cfg.PublicURL, "https://")
}

func (s *Server) setStateCookie(w http.ResponseWriter, r *http.Request, st oauthlogin.State) {
	http.SetCookie(w, &http.Cookie{Name: oauthStateCookie, Value: st.Seal(s.oauthKey()), Path: "/auth/oauth/",
		MaxAge: int(oauthStateTTL.Seconds()), HttpOnly: true, Secure: s.secureCookies(r), SameSite: http.SameSiteLaxMode})
}

// dashboardURL is a path of the dashboard, absolute when PublicURL is set.
func (s *Server) dashboardURL(path string) string {
	return strings.TrimRight(s.cfg.PublicURL, "/") + path
}

func (s *Server) listOAuthProviders(w http.ResponseWriter, _ *http.Request, _ *principal) error {
	names := make([]string, 0, len(s.cfg.OAuth))
	for name := range s.cfg.OAuth {
		names = append(names, name)
	}
	sort.Strings(names)
	writeJSON(w, http.StatusOK, map[string]any{"providers": names})
	return nil
}

// oauthStart sends the browser to the provider to sign in or sign up.
func (s *Server) oauthStart(w http.ResponseWriter, r *http.Request, _ *principal) error {
	prov, err := s.oauthProvider(r)
	if err != nil {
		return err
	}
	intent := oauthlogin.IntentLogin
	if r.URL.Query().Get("intent") == oauthlogin.IntentSignup {
		intent = oauthlogin.IntentSignup
	}
	st := oauthlogin.NewState(prov.Name(), intent, "", oauthStateTTL)
	s.setStateCookie(w, r, st)
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, prov.AuthURL(st.Nonce), http.StatusFound)
	return nil
}

// oauthConnect starts linking a provider to the signed-in user: the
// dashboard sends the browser to auth_url.
func (s *Server) oauthConnect(w http.ResponseWriter, r *http.Request, p *principal) error {
	prov, err := s.oauthProvider(r)
	if err != nil {
		return err
	}
	st := oauthlogin.NewState(prov.Name(), oauthlogin.IntentLink, p.UserID, oauthStateTTL)
	s.setStateCookie(w, r, st)
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, map[string]string{"auth_url": prov.AuthURL(st.Nonce)})
	return nil
}

// oauthCallback is where the provider sends the browser back. Every
// outcome is a redirect to the dashboard's callback page.
func (s *Server) oauthCallback(w http.ResponseWriter, r *http.Request, _ *principal) error {
	prov, err := s.oauthProvider(r)
	if err != nil {
		return err
	}
	ctx := r.Context()
	back := s.dashboardURL("/auth/" + prov.Name() + "/callback")
	w.Header().Set("Cache-Control", "no-store")
	fail := func(code string) error {
		s.log.Info("sign-in with a provider refused", "provider", prov.Name(), "reason", code)
		http.Redirect(w, r, back+"?error="+url.QueryEscape(code), http.StatusFound)
		return nil
	}
	// The state is used once: the cookie goes whatever happens.
	http.SetCookie(w, &http.Cookie{Name: oauthStateCookie, Value: "", Path: "/auth/oauth/", MaxAge: -1, HttpOnly: true,
		Secure: s.secureCookies(r), SameSite: http.SameSiteLaxMode})
	c, err := r.Cookie(oauthStateCookie)
	if err != nil {
		return fail("invalid_state")
	}
	st, err := oauthlogin.Open(s.oauthKey(), c.Value)
	q := r.URL.Query()
	if err != nil || st.Provider != prov.Name() || !hmac.Equal([]byte(q.Get("state")), []byte(st.Nonce)) {
		return fail("invalid_state")
	}
	if q.Get("error") != "" {
		return fail("access_denied")
	}
	if q.Get("code") == "" {
		return fail("missing_code")
	}
	profile, err := prov.Profile(ctx, q.Get("code"))
	if errors.Is(err, oauthlogin.ErrNoVerifiedEmail) {
		return fail("no_verified_email")
	}
	if err != nil {
		s.log.Warn("sign-in with a provider: the provider's answer failed", "provider", prov.Name(), "err", err)
		return fail("exchange_failed")
	}
	id := store.Identity{Provider: prov.Name(), ProviderID: profile.ID, Email: profile.Email}
	if st.Intent == oauthlogin.IntentLink {
		return s.oauthLink(w, r, st.UserID, id, back, fail)
	}
	u, err := s.st.IdentityUser(ctx, id.Provider, id.ProviderID)
	switch {
	case err == nil:
		if u.Status != "active" {
			return fail("account_inactive")
		}
	case !errors.Is(err, store.ErrNotFound):
		return err
	case st.Intent != oauthlogin.IntentSignup:
		return fail("no_account")
	default:
		if u, err = s.oauthSignup(w, r, profile, id); err != nil {
			var ae *apiError
			if errors.As(err, &ae) {
				return fail(ae.code)
			}
			return err
		}
	}
	teams, err := s.st.TeamsForUser(ctx, u.ID)
	if err != nil {
		return err
	}
	if len(teams) == 0 {
		return fail("no_team")
	}
	membership, err := s.st.MembershipKey(ctx, teams[0].ID, u.ID)
	if err != nil {
		return err
	}
	token, err := s.signer.UserToken(u.ID, teams[0].ID, u.Email, u.Name, u.IsAdmin, u.SessionEpoch, membership)
	if err != nil {
		return err
	}
	s.audit(ctx, &principal{UserID: u.ID, Email: u.Email}, "", "user", u.ID, "user.login", nil, map[string]any{"provider": prov.Name()})
	// Cookies rather than the URL: tokens stay out of logs, history and Referer.
	for i, v := range []string{token, u.ID, teams[0].ID, u.Email, u.Name} {
		http.SetCookie(w, &http.Cookie{Name: oauthSessionCookies[i], Value: v, Path: "/auth/", MaxAge: 60,
			Secure: s.secureCookies(r), SameSite: http.SameSiteLaxMode})
	}
	http.Redirect(w, r, back, http.StatusFound)
	return nil
}

// oauthSignup makes an account for a provider account no user has: its
// email must be free (a password account with it signs in and links the
// provider instead); a never-activated signup with it gives way.
func (s *Server) oauthSignup(w http.ResponseWriter, r *http.Request, profile oauthlogin.Profile, id store.Identity) (store.User, error) {
	ctx := r.Context()
	if wait, ok := s.signups.allow("signup:" + s.clientKey(r)); !ok {
		w.Header().Set("Retry-After", wait)
		return store.User{}, errf(http.StatusTooManyRequests, "rate_limited", "too many new accounts from this address")
	}
	if !validEmail(profile.Email) {
		return store.User{}, errf(http.StatusBadRequest, "no_verified_email", "the provider's email is not an address")
	}
	if err := s.st.DeletePendingUser(ctx, profile.Email, false); err != nil {
		return store.User{}, err
	}
	name := profile.Name
	if checkName(name, 100, "name") != nil {
		name = ""
	}
	teamName := name
	if teamName == "" {
		teamName = strings.SplitN(profile.Email, "@", 2)[0]
	}
	u, err := s.st.CreateIdentityUser(ctx, store.User{ID: ids.New("usr"), Email: profile.Email, Name: name, Status: "active"},
		store.Team{ID: ids.New("team"), Name: teamName + "'s team", Slug: newSlug()}, id)
	if errors.Is(err, store.ErrConflict) {
		// The email has an account, or a concurrent callback made this one.
		if again, err := s.st.IdentityUser(ctx, id.Provider, id.ProviderID); err == nil && again.Status == "active" {
			return again, nil
		}
		return store.User{}, errf(http.StatusConflict, "email_taken", "an account with this email exists: log in and connect the provider")
	}
	if err != nil {
		return store.User{}, err
	}
	s.log.Info("account created", "user", u.ID, "provider", id.Provider, "admin", u.IsAdmin)
	s.audit(ctx, &principal{UserID: u.ID, Email: u.Email}, "", "user", u.ID, "user.signup", nil, map[string]any{"provider": id.Provider, "admin": u.IsAdmin})
	return u, nil
}

// oauthLink gives the user who started a connect the provider account.
func (s *Server) oauthLink(w http.ResponseWriter, r *http.Request, userID string, id store.Identity, back string, fail func(string) error) error {
	ctx := r.Context()
	u, err := s.st.UserByID(ctx, userID)
	if errors.Is(err, store.ErrNotFound) || (err == nil && u.Status != "active") {
		return fail("account_inactive")
	}
	if err != nil {
		return err
	}
	id.UserID = u.ID
	err = s.st.LinkIdentity(ctx, id)
	if errors.Is(err, store.ErrConflict) {
		owner, oerr := s.st.IdentityUser(ctx, id.Provider, id.ProviderID)
		if oerr != nil || owner.ID != u.ID {
			// Another account has this provider account, or this user has
			// another account of the provider.
			return fail("already_linked")
		}
		err = nil
	}
	p := &principal{UserID: u.ID, Email: u.Email}
	s.audit(ctx, p, "", "user", u.ID, "user.provider_connect", err, map[string]any{"provider": id.Provider})
	if err != nil {
		return err
	}
	http.Redirect(w, r, back+"?connected="+url.QueryEscape(id.Provider), http.StatusFound)
	return nil
}

func (s *Server) oauthDisconnect(w http.ResponseWriter, r *http.Request, p *principal) error {
	provider := r.PathValue("provider")
	err := s.st.UnlinkIdentity(r.Context(), p.UserID, provider)
	if errors.Is(err, store.ErrLastSignIn) {
		return errf(http.StatusBadRequest, "last_login_method", "this is your only way to sign in: set a password first (POST /v1/me/password)")
	}
	if errors.Is(err, store.ErrNotFound) {
		return errf(http.StatusNotFound, "not_found", "%q is not connected to your account", provider)
	}
	s.audit(r.Context(), p, "", "user", p.UserID, "user.provider_disconnect", err, map[string]any{"provider": provider})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
