package api

import (
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/mail"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
	"github.com/wrenn/wrenn/internal/testutil/smtptest"
)

var tokenInMail = regexp.MustCompile(`token=((?:act|rst)_[A-Za-z0-9]+)`)

func mailedToken(t *testing.T, box *smtptest.Server, n int, to string) string {
	t.Helper()
	msgs := box.Messages()
	if len(msgs) != n {
		t.Fatalf("%d mails, want %d", len(msgs), n)
	}
	m := msgs[n-1]
	if m.To != to || !strings.Contains(m.Data, "https://wrenn.example.com/") {
		t.Fatalf("mail: to %s: %s", m.To, m.Data)
	}
	got := tokenInMail.FindStringSubmatch(m.Data)
	if got == nil {
		t.Fatalf("no token in mail: %s", m.Data)
	}
	return got[1]
}

// With SMTP configured, signup needs the mailed activation link, and a
// forgotten password is reset through a mailed, single-use token.
func TestActivationAndPasswordReset(t *testing.T) {
	box := smtptest.Start(t)
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Mailer = &mail.SMTP{Addr: box.Addr, From: "wrenn@example.com"}
		cfg.PublicURL = "https://wrenn.example.com/"
	})
	login := func(pw string) response {
		return c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "new@example.com", "password": pw})
	}
	var created struct{ Message, UserID string }
	c.want(c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": "new@example.com", "password": "first password", "name": "N"}), 201).json(t, &created)
	if c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": "NEW@example.com", "password": "first password"}).status != 409 {
		t.Fatal("a pending account's email was taken twice")
	}
	if code := c.want(login("first password"), 403).errorCode(t); code != "account_inactive" {
		t.Fatalf("login before activation: %s", code)
	}
	act := mailedToken(t, box, 1, "new@example.com")
	c.want(c.do("POST", "/v1/auth/activate", creds{}, map[string]string{"token": "act_wrong"}), 400)
	var a struct{ Token, UserID string }
	c.want(c.do("POST", "/v1/auth/activate", creds{}, map[string]string{"token": act}), 200).json(t, &a)
	if a.Token == "" || a.UserID != created.UserID {
		t.Fatalf("activate: %+v", a)
	}
	c.want(c.do("GET", "/v1/me", creds{jwt: a.Token}, nil), 200)
	c.want(c.do("POST", "/v1/auth/activate", creds{}, map[string]string{"token": act}), 400) // single use
	c.want(login("first password"), 200)

	// An expired, unused activation does not block the email for ever.
	c.want(c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": "late@example.com", "password": "late password"}), 201)
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE user_tokens SET expires_at = now() - interval '1 minute' WHERE kind = 'activation' AND used_at IS NULL"); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("POST", "/v1/auth/activate", creds{}, map[string]string{"token": mailedToken(t, box, 2, "late@example.com")}), 400)
	c.want(c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": "late@example.com", "password": "late password"}), 201)
	mailedToken(t, box, 3, "late@example.com")

	// Reset: unknown addresses answer the same and get no mail.
	c.want(c.do("POST", "/v1/me/password/reset", creds{}, map[string]string{"email": "nobody@example.com"}), 204)
	if n := len(box.Messages()); n != 3 {
		t.Fatalf("a mail went to an unknown address (%d mails)", n)
	}
	c.want(c.do("POST", "/v1/me/password/reset", creds{}, map[string]string{"email": "not an email"}), 400)
	c.want(c.do("POST", "/v1/me/password/reset", creds{}, map[string]string{"email": "new@example.com"}), 204)
	rst := mailedToken(t, box, 4, "new@example.com")
	c.want(c.do("POST", "/v1/me/password/reset/confirm", creds{}, map[string]string{"token": rst, "new_password": "short"}), 400)
	c.want(c.do("POST", "/v1/me/password/reset/confirm", creds{}, map[string]string{"token": act, "new_password": "second password"}), 400) // wrong kind
	c.want(c.do("POST", "/v1/me/password/reset/confirm", creds{}, map[string]string{"token": rst, "new_password": "second password"}), 204)
	c.want(c.do("POST", "/v1/me/password/reset/confirm", creds{}, map[string]string{"token": rst, "new_password": "third password"}), 400)
	c.want(login("first password"), 401)
	c.want(login("second password"), 200)
	// Nobody's inbox is flooded: a few reset mails an hour per account.
	limited := false
	for range 10 {
		if r := c.do("POST", "/v1/me/password/reset", creds{}, map[string]string{"email": "new@example.com"}); r.status == http.StatusTooManyRequests {
			limited = r.header.Get("Retry-After") != ""
			break
		}
	}
	if !limited {
		t.Fatal("ten reset requests for one account in a row were all sent")
	}
}

// Without SMTP, signups are active at once and reset by mail says plainly
// that it is off; an operator resets passwords with wrenn-cp.
func TestNoMailConfigured(t *testing.T) {
	c := newCP(t)
	c.signup("plain@example.com")
	r := c.want(c.do("POST", "/v1/me/password/reset", creds{}, map[string]string{"email": "plain@example.com"}), http.StatusServiceUnavailable)
	if code := r.errorCode(t); code != "mail_not_configured" {
		t.Fatalf("reset without mail: %s", code)
	}
	if _, err := c.srv.ResetPassword(t.Context(), "plain@example.com", "a new password"); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "plain@example.com", "password": "a new password"}), 200)
	if _, err := c.srv.ResetPassword(t.Context(), "plain@example.com", "short"); err == nil {
		t.Fatal("a short password was accepted")
	}
}
