package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Lifetimes of the tokens mailed to users.
const (
	activationTTL = 30 * time.Minute
	resetTTL      = 15 * time.Minute
)

// signupWithActivation creates a pending account and mails its activation
// link. If the mail cannot be sent the account is removed again, so the
// person can simply retry.
func (s *Server) signupWithActivation(w http.ResponseWriter, r *http.Request, email, password, name string) error {
	ctx := r.Context()
	// An earlier signup whose link expired unused must not block this one.
	if err := s.st.DeletePendingUser(ctx, strings.TrimSpace(email), true); err != nil {
		return err
	}
	u, err := s.createAccount(ctx, email, password, name, false, "pending")
	if err != nil {
		return err
	}
	token := "act_" + auth.RandomString(32)
	if err := s.st.AddUserToken(ctx, u.ID, "activation", auth.HashToken(token), time.Now().Add(activationTTL)); err != nil {
		return err
	}
	body := fmt.Sprintf("Welcome to Wrenn.\n\nActivate your account within 30 minutes:\n\n  %s/activate?token=%s\n\n"+
		"Or send the token to POST /v1/auth/activate:\n\n  %s\n\nIf you did not sign up, ignore this mail.\n", s.publicURL(), token, token)
	if err := s.cfg.Mailer.Send(ctx, u.Email, "Activate your Wrenn account", body); err != nil {
		s.log.Error("activation mail failed; removing the pending account", "user", u.ID, "err", err)
		if derr := s.st.DeletePendingUser(context.WithoutCancel(ctx), u.Email, false); derr != nil {
			s.log.Error("remove pending account", "user", u.ID, "err", derr)
		}
		return errf(http.StatusServiceUnavailable, "mail_unavailable", "the activation mail could not be sent; try again later")
	}
	writeJSON(w, http.StatusCreated, map[string]any{"message": "check your mail: the activation link is valid for 30 minutes", "user_id": u.ID})
	return nil
}

func (s *Server) publicURL() string {
	if s.cfg.PublicURL != "" {
		return strings.TrimRight(s.cfg.PublicURL, "/")
	}
	return "http://localhost:8000"
}

var errBadToken = errf(http.StatusBadRequest, "invalid_token", "the token is unknown, used or expired")

// activate consumes an activation token and signs the person in.
func (s *Server) activate(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		Token string `json:"token"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Token == "" || len(req.Token) > 200 {
		return badRequest("token is required")
	}
	userID, err := s.st.UseUserToken(r.Context(), "activation", auth.HashToken(req.Token))
	if errors.Is(err, store.ErrNotFound) {
		return errBadToken
	}
	if err != nil {
		return err
	}
	if err := s.st.SetUserStatus(r.Context(), userID, "active"); err != nil {
		return err
	}
	u, err := s.st.UserByID(r.Context(), userID)
	if err != nil {
		return err
	}
	s.audit(r.Context(), &principal{UserID: u.ID, Email: u.Email}, "", "user", u.ID, "user.activate", nil, nil)
	return s.signIn(w, r, u)
}

// requestPasswordReset mails a reset link. It answers 204 whether or not
// the account exists, so it cannot be used to find accounts.
func (s *Server) requestPasswordReset(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		Email string `json:"email"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	email := strings.TrimSpace(req.Email)
	if !validEmail(email) {
		return badRequest("email is not a valid address")
	}
	if s.cfg.Mailer == nil {
		return errf(http.StatusServiceUnavailable, "mail_not_configured",
			"this server sends no mail (WRENN_SMTP_URL is unset); an administrator can set a new password with wrenn-cp admin reset-password")
	}
	// Per account, whichever address asks: nobody's inbox is flooded.
	if wait, ok := s.mails.allow("reset:" + strings.ToLower(email)); !ok {
		w.Header().Set("Retry-After", wait)
		return errf(http.StatusTooManyRequests, "rate_limited", "too many reset requests; retry after %s s", wait)
	}
	u, err := s.st.UserByEmail(r.Context(), email)
	switch {
	case errors.Is(err, store.ErrNotFound), err == nil && u.Status != "active":
		s.log.Info("password reset asked for an unknown or inactive account")
	case err != nil:
		return err
	default:
		token := "rst_" + auth.RandomString(32)
		if err := s.st.AddUserToken(r.Context(), u.ID, "password_reset", auth.HashToken(token), time.Now().Add(resetTTL)); err != nil {
			return err
		}
		body := fmt.Sprintf("Someone asked to reset the password of your Wrenn account.\n\nChoose a new one within 15 minutes:\n\n  %s/reset-password?token=%s\n\n"+
			"Or send the token to POST /v1/me/password/reset/confirm:\n\n  %s\n\nIf it was not you, ignore this mail; your password stays as it is.\n", s.publicURL(), token, token)
		if err := s.cfg.Mailer.Send(r.Context(), u.Email, "Reset your Wrenn password", body); err != nil {
			s.log.Error("password reset mail failed", "user", u.ID, "err", err)
			return errf(http.StatusServiceUnavailable, "mail_unavailable", "the mail could not be sent; try again later")
		}
		s.audit(r.Context(), &principal{UserID: u.ID, Email: u.Email}, "", "user", u.ID, "user.password_reset_request", nil, nil)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// confirmPasswordReset consumes a reset token and sets the new password.
func (s *Server) confirmPasswordReset(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		Token       string `json:"token"`
		NewPassword string `json:"new_password"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Token == "" || len(req.Token) > 200 {
		return badRequest("token is required")
	}
	if err := checkPassword(req.NewPassword); err != nil {
		return err
	}
	hash, err := auth.HashPassword(req.NewPassword)
	if err != nil {
		return err
	}
	userID, err := s.st.UseUserToken(r.Context(), "password_reset", auth.HashToken(req.Token))
	if errors.Is(err, store.ErrNotFound) {
		return errBadToken
	}
	if err != nil {
		return err
	}
	_, err = s.st.SetPassword(r.Context(), userID, hash)
	s.audit(r.Context(), &principal{UserID: userID}, "", "user", userID, "user.password_reset", err, nil)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
