package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/mail"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

type authResponse struct {
	Token   string `json:"token"`
	UserID  string `json:"user_id"`
	TeamID  string `json:"team_id"`
	Email   string `json:"email"`
	Name    string `json:"name"`
	IsAdmin bool   `json:"is_admin"`
}

func validEmail(s string) bool {
	a, err := mail.ParseAddress(s)
	return err == nil && a.Address == s && len(s) <= 254
}

func checkPassword(pw string) error {
	if len(pw) < auth.MinPasswordLength {
		return badRequest("password must be at least %d characters", auth.MinPasswordLength)
	}
	if len(pw) > 72 {
		return badRequest("password must be at most 72 bytes")
	}
	return nil
}

func checkName(name string, max int, what string) error {
	if !utf8.ValidString(name) || utf8.RuneCountInString(name) > max {
		return badRequest("%s must be valid text of at most %d characters", what, max)
	}
	return nil
}

func newSlug() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:6] + "-" + h[6:]
}

// signup creates an active account with its own team. (There is no mail
// delivery yet, so accounts are not held back for activation.)
func (s *Server) signup(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		Email    string `json:"email"`
		Password string `json:"password"`
		Name     string `json:"name"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	// Each account brings a team with its own quota: accounts come slowly.
	if wait, ok := s.signups.allow("signup:" + s.clientKey(r)); !ok {
		w.Header().Set("Retry-After", wait)
		return errf(http.StatusTooManyRequests, "rate_limited", "too many new accounts from this address; retry after %s s", wait)
	}
	if s.cfg.Mailer == nil {
		u, err := s.createAccount(r.Context(), req.Email, req.Password, req.Name, false, "active")
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, map[string]any{"message": "account created; sign in with POST /v1/auth/login", "user_id": u.ID})
		return nil
	}
	return s.signupWithActivation(w, r, req.Email, req.Password, req.Name)
}

// CreateAdmin makes a platform-admin account (wrenn-cp admin create).
func (s *Server) CreateAdmin(ctx context.Context, email, password, name string) (store.User, error) {
	return s.createAccount(ctx, email, password, name, true, "active")
}

// createAccount validates and stores a new account with its own team.
func (s *Server) createAccount(ctx context.Context, email, password, name string, admin bool, status string) (store.User, error) {
	email = strings.TrimSpace(email)
	if !validEmail(email) {
		return store.User{}, badRequest("email is not a valid address")
	}
	if err := checkPassword(password); err != nil {
		return store.User{}, err
	}
	if err := checkName(name, 100, "name"); err != nil {
		return store.User{}, err
	}
	hash, err := auth.HashPassword(password)
	if err != nil {
		return store.User{}, err
	}
	teamName := name
	if teamName == "" {
		teamName = strings.SplitN(email, "@", 2)[0]
	}
	u, err := s.st.CreateUser(ctx, store.User{ID: ids.New("usr"), Email: email, Name: name, PasswordHash: hash, Status: status},
		store.Team{ID: ids.New("team"), Name: teamName + "'s team", Slug: newSlug()}, admin)
	if errors.Is(err, store.ErrConflict) {
		return store.User{}, conflict("an account with this email already exists")
	}
	if err != nil {
		return store.User{}, err
	}
	s.log.Info("account created", "user", u.ID, "admin", u.IsAdmin)
	p := &principal{UserID: u.ID, Email: u.Email}
	s.audit(ctx, p, "", "user", u.ID, "user.signup", nil, map[string]any{"admin": u.IsAdmin})
	return u, nil
}

// After loginFailuresFree wrong passwords in a row an account waits
// loginWait before the next try, doubling with each failure up to
// loginMaxWait; a success clears it.
const (
	loginFailuresFree = 5
	loginWait         = time.Second
	loginMaxWait      = 15 * time.Minute
)

func (s *Server) login(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		Email    string `json:"email"`
		Password string `json:"password"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Email == "" || req.Password == "" {
		return badRequest("email and password are required")
	}
	// Throttle guessing per email as well as per source.
	if wait, ok := s.limit.allow("login:" + strings.ToLower(req.Email)); !ok {
		w.Header().Set("Retry-After", wait)
		return errf(http.StatusTooManyRequests, "rate_limited", "too many login attempts; retry after %s s", wait)
	}
	invalid := errf(http.StatusUnauthorized, "invalid_credentials", "wrong email or password")
	waiting := func(until time.Time) error {
		secs := strconv.Itoa(int(time.Until(until).Seconds()) + 1)
		w.Header().Set("Retry-After", secs)
		return errf(http.StatusTooManyRequests, "rate_limited", "too many failed logins for this account; retry after %s s", secs)
	}
	u, err := s.st.UserByEmail(r.Context(), req.Email)
	if errors.Is(err, store.ErrNotFound) {
		// An unknown email waits as an account would, so that the waits
		// do not tell which emails have accounts.
		if ok, until := s.misses.attempt(strings.ToLower(req.Email)); !ok {
			return waiting(until)
		}
		auth.BurnPasswordCheck(req.Password)
		return invalid
	}
	if err != nil {
		return err
	}
	// After repeated failures an account waits, whichever address asks:
	// guessing spread over many addresses gains nothing.
	ok, until, err := s.st.LoginAttempt(r.Context(), u.ID, loginFailuresFree, loginWait, loginMaxWait)
	if err != nil {
		return err
	}
	if !ok {
		return waiting(until)
	}
	if auth.CheckPassword(u.PasswordHash, req.Password) != nil {
		s.audit(r.Context(), &principal{UserID: u.ID, Email: u.Email}, "", "user", u.ID, "user.login", errors.New("wrong password"), nil)
		return invalid
	}
	if err := s.st.LoginSucceeded(r.Context(), u.ID); err != nil {
		return err
	}
	if u.Status == "pending" {
		return errf(http.StatusForbidden, "account_inactive", "this account is not activated yet; use the link in the activation mail")
	}
	if u.Status != "active" {
		return errf(http.StatusForbidden, "account_inactive", "this account is %s", u.Status)
	}
	return s.signIn(w, r, u)
}

// signIn answers a JWT for the user's first team.
func (s *Server) signIn(w http.ResponseWriter, r *http.Request, u store.User) error {
	teams, err := s.st.TeamsForUser(r.Context(), u.ID)
	if err != nil {
		return err
	}
	if len(teams) == 0 {
		return errf(http.StatusForbidden, "no_team", "this account belongs to no team")
	}
	return s.issue(w, r, u, teams[0].ID)
}

func (s *Server) issue(w http.ResponseWriter, r *http.Request, u store.User, teamID string) error {
	membership, err := s.st.MembershipKey(r.Context(), teamID, u.ID)
	if err != nil {
		return err
	}
	token, err := s.signer.UserToken(u.ID, teamID, u.Email, u.Name, u.IsAdmin, u.SessionEpoch, membership)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, authResponse{Token: token, UserID: u.ID, TeamID: teamID, Email: u.Email, Name: u.Name, IsAdmin: u.IsAdmin})
	return nil
}

func (s *Server) switchTeam(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		TeamID string `json:"team_id"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.TeamID == "" {
		return badRequest("team_id is required")
	}
	if _, err := s.st.MemberRole(r.Context(), req.TeamID, p.UserID); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return notFound("team")
		}
		return err
	}
	u, err := s.st.UserByID(r.Context(), p.UserID)
	if err != nil {
		return err
	}
	return s.issue(w, r, u, req.TeamID)
}

func (s *Server) me(w http.ResponseWriter, r *http.Request, p *principal) error {
	u, err := s.st.UserByID(r.Context(), p.UserID)
	if err != nil {
		return err
	}
	linked, err := s.st.Identities(r.Context(), u.ID)
	if err != nil {
		return err
	}
	providers := make([]string, 0, len(linked))
	for _, id := range linked {
		providers = append(providers, id.Provider)
	}
	writeJSON(w, http.StatusOK, map[string]any{"user_id": u.ID, "name": u.Name, "email": u.Email, "has_password": u.PasswordHash != "",
		"providers": providers, "is_admin": u.IsAdmin, "team_id": p.TeamID, "role": p.Role, "created_at": u.CreatedAt})
	return nil
}

// deleteMe deletes the caller's account, as upstream: the body repeats
// the account's email; it is refused while the user owns a team others
// belong to (or is the last platform admin); the teams they alone own go
// (their capsules destroyed); the account is purged after the grace
// period (WRENN_ACCOUNT_GRACE).
func (s *Server) deleteMe(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Confirmation string `json:"confirmation"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	ctx := r.Context()
	u, err := s.st.UserByID(ctx, p.UserID)
	if err != nil {
		return err
	}
	if !strings.EqualFold(strings.TrimSpace(req.Confirmation), u.Email) {
		return badRequest("confirmation must be your account's email address")
	}
	blockers, alone, err := s.st.DeletionBlockers(ctx, u.ID)
	if err != nil {
		return err
	}
	if blockers.SharedTeams > 0 {
		return errf(http.StatusConflict, "owns_team_with_members",
			"you own %d team(s) with other members: transfer ownership or remove the members before deleting your account", blockers.SharedTeams)
	}
	if blockers.LastAdmin {
		return errf(http.StatusConflict, "last_admin", "you are the only platform admin: make another user admin before deleting your account")
	}
	for _, teamID := range alone {
		if err := s.removeTeam(ctx, p, teamID, map[string]any{"reason": "its owner deleted their account"}); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
	}
	err = s.st.DeleteAccount(ctx, u.ID)
	s.audit(ctx, p, "", "user", u.ID, "user.delete", err, map[string]any{"teams_deleted": len(alone)})
	if err != nil {
		return err
	}
	s.log.Info("account deleted by its user; purged after the grace period", "user", u.ID, "teams_deleted", len(alone))
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// searchUsers finds accounts by the start of their email, for adding
// team members: at least three characters with an "@", ten answers.
func (s *Server) searchUsers(w http.ResponseWriter, r *http.Request, _ *principal) error {
	prefix := strings.TrimSpace(r.URL.Query().Get("email"))
	if len(prefix) < 3 || !strings.Contains(prefix, "@") || len(prefix) > 254 {
		return badRequest("email must be the start of an address: at least 3 characters, with its @")
	}
	found, err := s.st.SearchUsers(r.Context(), prefix, 10)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, found)
	return nil
}

func (s *Server) updateMe(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	req.Name = strings.TrimSpace(req.Name)
	if req.Name == "" {
		return badRequest("name is required")
	}
	if err := checkName(req.Name, 100, "name"); err != nil {
		return err
	}
	if err := s.st.SetUserName(r.Context(), p.UserID, req.Name); err != nil {
		return err
	}
	u, err := s.st.UserByID(r.Context(), p.UserID)
	if err != nil {
		return err
	}
	return s.issue(w, r, u, p.TeamID)
}

func (s *Server) changePassword(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		CurrentPassword string `json:"current_password"`
		NewPassword     string `json:"new_password"`
		ConfirmPassword string `json:"confirm_password"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if err := checkPassword(req.NewPassword); err != nil {
		return err
	}
	u, err := s.st.UserByID(r.Context(), p.UserID)
	if err != nil {
		return err
	}
	if u.PasswordHash == "" {
		// An account made through a provider adds its first password; it
		// has no current one, so the new one is typed twice (as upstream).
		if req.ConfirmPassword != req.NewPassword {
			return badRequest("confirm_password must repeat new_password")
		}
	} else if auth.CheckPassword(u.PasswordHash, req.CurrentPassword) != nil {
		s.audit(r.Context(), p, "", "user", u.ID, "user.password_change", errors.New("wrong current password"), nil)
		return errf(http.StatusUnauthorized, "invalid_credentials", "the current password is wrong")
	}
	hash, err := auth.HashPassword(req.NewPassword)
	if err != nil {
		return err
	}
	// Every session ends, this one too: the user signs in with the new password.
	_, err = s.st.SetPassword(r.Context(), u.ID, hash)
	s.audit(r.Context(), p, "", "user", u.ID, "user.password_change", err, nil)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// ResetPassword sets a new password for an account by email (wrenn-cp
// admin reset-password, for installs that send no mail).
func (s *Server) ResetPassword(ctx context.Context, email, password string) (store.User, error) {
	if err := checkPassword(password); err != nil {
		return store.User{}, err
	}
	u, err := s.st.UserByEmail(ctx, strings.TrimSpace(email))
	if err != nil {
		return u, fmt.Errorf("find %s: %w", email, err)
	}
	hash, err := auth.HashPassword(password)
	if err != nil {
		return u, err
	}
	_, err = s.st.SetPassword(ctx, u.ID, hash)
	s.audit(ctx, &principal{}, "", "user", u.ID, "user.password_reset", err, map[string]any{"by": "wrenn-cp admin"})
	return u, err
}
