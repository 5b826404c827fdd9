package api

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/oauthlogin"
	"github.com/wrenn/wrenn/internal/controlplane/oauthlogin/githubtest"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// lateProvider lets the test make the provider once the control plane's
// address (its callback) is known.
type lateProvider struct{ oauthlogin.Provider }

// oauthCP is a control plane with sign-in through a stand-in GitHub.
func oauthCP(t *testing.T) (*cp, *githubtest.Server) {
	t.Helper()
	gh := githubtest.New("client-1", "secret-1")
	t.Cleanup(gh.Close)
	late := &lateProvider{}
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.OAuth = map[string]oauthlogin.Provider{"github": late}
	})
	late.Provider = oauthlogin.NewGitHub(oauthlogin.GitHubConfig{ClientID: "client-1", ClientSecret: "secret-1",
		CallbackURL: c.url + "/auth/oauth/github/callback", WebURL: gh.URL, APIURL: gh.URL})
	return c, gh
}

// browser follows redirects with cookies, as a browser would, and stops
// at the dashboard's callback page.
type browser struct {
	t  *testing.T
	hc *http.Client
}

func newBrowser(t *testing.T) *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{t: t, hc: &http.Client{Jar: jar, CheckRedirect: func(req *http.Request, _ []*http.Request) error {
		if strings.HasPrefix(req.URL.Path, "/auth/github/callback") {
			return http.ErrUseLastResponse
		}
		return nil
	}}}
}

// landing is where the flow ended: the dashboard page's query, and the
// session cookies it was handed.
type landing struct {
	query   url.Values
	cookies map[string]string
}

func (b *browser) visit(u string, jwt string) (*http.Response, []byte) {
	b.t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	if jwt != "" {
		req.Header.Set("Authorization", "Bearer "+jwt)
	}
	res, err := b.hc.Do(req)
	if err != nil {
		b.t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return res, body
}

func (b *browser) signIn(c *cp, start string) landing {
	b.t.Helper()
	res, body := b.visit(start, "")
	return b.landed(c, res, body)
}

func (b *browser) landed(c *cp, res *http.Response, body []byte) landing {
	b.t.Helper()
	if res.StatusCode != http.StatusFound {
		b.t.Fatalf("flow ended with %d, not at the dashboard: %s", res.StatusCode, body)
	}
	loc, err := url.Parse(res.Header.Get("Location"))
	if err != nil || loc.Path != "/auth/github/callback" {
		b.t.Fatalf("flow ended at %q", res.Header.Get("Location"))
	}
	l := landing{query: loc.Query(), cookies: map[string]string{}}
	page, _ := url.Parse(c.url + "/auth/github/callback")
	for _, ck := range b.hc.Jar.Cookies(page) {
		l.cookies[ck.Name] = ck.Value
	}
	return l
}

func TestSignInWithGitHub(t *testing.T) {
	c, gh := oauthCP(t)
	c.signup("first@example.com") // the install's admin
	gh.Approve(githubtest.Account{ID: 4242, Login: "octo", Name: "Octo Cat", Email: "Octo@Example.com", Verified: true})

	// Logging in with an identity nobody has is refused; signing up makes it.
	if l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github"); l.query.Get("error") != "no_account" {
		t.Fatalf("login without an account: %v", l.query)
	}
	l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github?intent=signup")
	tok := l.cookies["wrenn_oauth_token"]
	if l.query.Get("error") != "" || tok == "" || l.cookies["wrenn_oauth_email"] != "octo@example.com" {
		t.Fatalf("signup landed with %v, cookies %v", l.query, l.cookies)
	}
	var me struct {
		UserID      string   `json:"user_id"`
		Email       string   `json:"email"`
		Name        string   `json:"name"`
		HasPassword bool     `json:"has_password"`
		Providers   []string `json:"providers"`
		IsAdmin     bool     `json:"is_admin"`
	}
	c.want(c.do("GET", "/v1/me", creds{jwt: tok}, nil), 200).json(t, &me)
	if me.Email != "octo@example.com" || me.Name != "Octo Cat" || me.HasPassword || len(me.Providers) != 1 || me.Providers[0] != "github" || me.IsAdmin {
		t.Fatalf("me %+v", me)
	}
	// Signing in again is the same account; no password works for it.
	again := newBrowser(t).signIn(c, c.url+"/auth/oauth/github")
	var me2 struct {
		UserID string `json:"user_id"`
	}
	c.want(c.do("GET", "/v1/me", creds{jwt: again.cookies["wrenn_oauth_token"]}, nil), 200).json(t, &me2)
	if me2.UserID != me.UserID {
		t.Fatalf("second sign-in is %s, first %s", me2.UserID, me.UserID)
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "octo@example.com", "password": "x"}), 401)

	// The only way in cannot be removed; with a password added, it can.
	if code := c.want(c.do("DELETE", "/v1/me/providers/github", creds{jwt: tok}, nil), 400).errorCode(t); code != "last_login_method" {
		t.Fatalf("code %s", code)
	}
	c.want(c.do("POST", "/v1/me/password", creds{jwt: tok}, map[string]string{"new_password": "a new password", "confirm_password": "other"}), 400)
	c.want(c.do("POST", "/v1/me/password", creds{jwt: tok}, map[string]string{"new_password": "a new password", "confirm_password": "a new password"}), 204)
	var login struct {
		Token string `json:"token"`
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "octo@example.com", "password": "a new password"}), 200).json(t, &login)
	c.want(c.do("DELETE", "/v1/me/providers/github", creds{jwt: login.Token}, nil), 204)
	c.want(c.do("DELETE", "/v1/me/providers/github", creds{jwt: login.Token}, nil), 404)
	if l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github"); l.query.Get("error") != "no_account" {
		t.Fatalf("login after disconnecting: %v", l.query)
	}

	// Unknown providers, and a state that is not the browser's, are refused.
	if code := c.want(c.do("GET", "/auth/oauth/gitlab", creds{}, nil), 404).errorCode(t); code != "provider_not_found" {
		t.Fatalf("code %s", code)
	}
	b := newBrowser(t)
	res, body := b.visit(c.url+"/auth/oauth/github/callback?code=x&state=forged", "")
	if l := b.landed(c, res, body); l.query.Get("error") != "invalid_state" || l.cookies["wrenn_oauth_token"] != "" {
		t.Fatalf("forged state: %v %v", l.query, l.cookies)
	}
	// A user who cancels at GitHub, or whose email is unverified, gets a reason.
	gh.Deny()
	if l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github?intent=signup"); l.query.Get("error") != "access_denied" {
		t.Fatalf("denied: %v", l.query)
	}
	gh.Approve(githubtest.Account{ID: 7, Login: "unv", Email: "unv@example.com", Verified: false})
	if l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github?intent=signup"); l.query.Get("error") != "no_verified_email" {
		t.Fatalf("unverified: %v", l.query)
	}
}

func TestLinkGitHubToAPasswordAccount(t *testing.T) {
	c, gh := oauthCP(t)
	pw := c.signup("dev@example.com")
	other := c.signup("other@example.com")
	gh.Approve(githubtest.Account{ID: 99, Login: "dev", Email: "dev@example.com", Verified: true})

	// Signing up with the email of a password account is refused: that
	// user links GitHub from their account instead.
	if l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github?intent=signup"); l.query.Get("error") != "email_taken" {
		t.Fatalf("signup over a password account: %v", l.query)
	}
	link := func(a account) landing {
		t.Helper()
		b := newBrowser(t)
		res, body := b.visit(c.url+"/v1/me/providers/github/connect", a.jwt)
		var out struct {
			AuthURL string `json:"auth_url"`
		}
		if res.StatusCode != 200 || json.Unmarshal(body, &out) != nil || !strings.HasPrefix(out.AuthURL, gh.URL) {
			t.Fatalf("connect: %d %s", res.StatusCode, body)
		}
		return b.signIn(c, out.AuthURL)
	}
	if l := link(pw); l.query.Get("connected") != "github" {
		t.Fatalf("link: %v", l.query)
	}
	var me struct {
		UserID      string   `json:"user_id"`
		HasPassword bool     `json:"has_password"`
		Providers   []string `json:"providers"`
	}
	c.want(c.do("GET", "/v1/me", creds{jwt: pw.jwt}, nil), 200).json(t, &me)
	if !me.HasPassword || len(me.Providers) != 1 {
		t.Fatalf("me %+v", me)
	}
	// GitHub now signs in as that account; linking it again is harmless,
	// and another account cannot take it.
	l := newBrowser(t).signIn(c, c.url+"/auth/oauth/github")
	var who struct {
		UserID string `json:"user_id"`
	}
	c.want(c.do("GET", "/v1/me", creds{jwt: l.cookies["wrenn_oauth_token"]}, nil), 200).json(t, &who)
	if who.UserID != pw.userID {
		t.Fatalf("GitHub signs in as %s, want %s", who.UserID, pw.userID)
	}
	if l := link(pw); l.query.Get("connected") != "github" {
		t.Fatalf("link again: %v", l.query)
	}
	if l := link(other); l.query.Get("error") != "already_linked" {
		t.Fatalf("another account took the identity: %v", l.query)
	}
	// An API key cannot start a link (it is a user's act).
	key := c.apiKey(pw)
	c.want(c.do("GET", "/v1/me/providers/github/connect", creds{key: key}, nil), 403)
}

func TestDeleteAccount(t *testing.T) {
	c := newCP(t)
	owner := c.signup("owner@example.com") // also the install's only admin
	member := c.signup("member@example.com")
	c.want(c.do("POST", "/v1/teams/"+owner.teamID+"/members", creds{jwt: owner.jwt}, map[string]string{"email": member.email}), 201)
	memberKey := c.apiKey(member)

	// Search finds active accounts by the start of their email.
	var found []struct {
		UserID string `json:"user_id"`
		Email  string `json:"email"`
	}
	c.want(c.do("GET", "/v1/users/search?email=member@", creds{jwt: owner.jwt}, nil), 200).json(t, &found)
	if len(found) != 1 || found[0].UserID != member.userID {
		t.Fatalf("search %+v", found)
	}
	c.want(c.do("GET", "/v1/users/search?email=me", creds{jwt: owner.jwt}, nil), 400)
	c.want(c.do("GET", "/v1/users/search?email=%25mber@", creds{jwt: owner.jwt}, nil), 200).json(t, &found)
	if len(found) != 0 {
		t.Fatalf("a LIKE wildcard matched: %+v", found)
	}

	// The body must repeat the email; an owner of a shared team, or the
	// last admin, is refused.
	c.want(c.do("DELETE", "/v1/me", creds{jwt: member.jwt}, map[string]string{"confirmation": "someone@example.com"}), 400)
	if code := c.want(c.do("DELETE", "/v1/me", creds{jwt: owner.jwt}, map[string]string{"confirmation": owner.email}), 409).errorCode(t); code != "owns_team_with_members" {
		t.Fatalf("code %s", code)
	}
	c.want(c.do("DELETE", "/v1/me", creds{jwt: member.jwt}, map[string]string{"confirmation": "MEMBER@example.com"}), 204)
	// Its sessions and keys end, it cannot log in, it left the team, and
	// its email stays taken until the purge.
	c.want(c.do("GET", "/v1/me", creds{jwt: member.jwt}, nil), 401)
	c.want(c.do("GET", "/v1/capsules", creds{key: memberKey}, nil), 401)
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": member.email, "password": "correct horse"}), 403)
	var members []struct {
		UserID string `json:"user_id"`
	}
	c.want(c.do("GET", "/v1/teams/"+owner.teamID+"/members", creds{jwt: owner.jwt}, nil), 200).json(t, &members)
	if len(members) != 1 {
		t.Fatalf("members after the deletion: %+v", members)
	}
	c.want(c.do("GET", "/v1/users/search?email=member@", creds{jwt: owner.jwt}, nil), 200).json(t, &found)
	if len(found) != 0 {
		t.Fatalf("a deleted account is found: %+v", found)
	}
	c.want(c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": member.email, "password": "correct horse"}), 409)
	if code := c.want(c.do("PUT", "/v1/admin/users/"+member.userID+"/active", creds{jwt: owner.jwt}, map[string]bool{"active": true}), 409).errorCode(t); code != "invalid_state" {
		t.Fatalf("code %s", code)
	}
	if code := c.want(c.do("DELETE", "/v1/me", creds{jwt: owner.jwt}, map[string]string{"confirmation": owner.email}), 409).errorCode(t); code != "last_admin" {
		t.Fatalf("code %s", code)
	}

	// Within the grace period nothing is purged; after it, the email is free.
	ctx := context.Background()
	if n, err := c.st.PurgeDeletedUsers(ctx, 24*3600e9); err != nil || n != 0 {
		t.Fatalf("purge within the grace period: %d %v", n, err)
	}
	if n, err := c.st.PurgeDeletedUsers(ctx, 0); err != nil || n != 1 {
		t.Fatalf("purge after it: %d %v", n, err)
	}
	c.want(c.do("POST", "/v1/auth/signup", creds{}, map[string]string{"email": member.email, "password": "correct horse"}), 201)
}
