package api

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
)

func TestSignupLoginAndJWT(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	var me struct {
		Email   string `json:"email"`
		IsAdmin bool   `json:"is_admin"`
		Role    string `json:"role"`
	}
	c.want(c.do("GET", "/v1/me", creds{jwt: admin.jwt}, nil), 200).json(t, &me)
	if me.Email != "admin@example.com" || !me.IsAdmin || me.Role != "owner" {
		t.Fatalf("first user: %+v", me)
	}
	second := c.signup("second@example.com")
	c.want(c.do("GET", "/v1/me", creds{jwt: second.jwt}, nil), 200).json(t, &me)
	if me.IsAdmin {
		t.Fatal("the second user is an admin")
	}

	// Bad input gets clear errors with the right status.
	cases := []struct {
		body   any
		status int
		code   string
	}{
		{`{"email": "x@example.com", "password": "short"}`, 400, "invalid_request"},
		{`{"email": "not-an-email", "password": "long enough"}`, 400, "invalid_request"},
		{`{"email": 5}`, 400, "invalid_request"},
		{`{"email": "a@b.c"`, 400, "invalid_request"},
		{``, 400, "invalid_request"},
		{`{"email": "admin@example.com", "password": "another one"}`, 409, "conflict"},
		{`{"email": "ADMIN@example.com", "password": "another one"}`, 409, "conflict"},
		{`{"email": "big@example.com", "password": "` + strings.Repeat("x", 2<<20) + `"}`, 413, "payload_too_large"},
	}
	for _, tc := range cases {
		r := c.do("POST", "/v1/auth/signup", creds{}, tc.body)
		if r.status != tc.status || r.errorCode(t) != tc.code {
			t.Errorf("signup %.60v: %d %s", tc.body, r.status, r.body)
		}
	}
	r := c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "admin@example.com", "password": "wrong password"}), 401)
	if r.errorCode(t) != "invalid_credentials" {
		t.Fatal(string(r.body))
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "nobody@example.com", "password": "whatever1"}), 401)

	// Tokens: garbage, wrong signature, expired.
	c.want(c.do("GET", "/v1/me", creds{jwt: "garbage"}, nil), 401)
	other := &auth.Signer{Secret: []byte("another-secret-0123456789abcdefghij")}
	forged, _ := other.UserToken(admin.userID, admin.teamID, admin.email, "", true, 0, "")
	c.want(c.do("GET", "/v1/me", creds{jwt: forged}, nil), 401)
	expired := &auth.Signer{Secret: c.srv.signer.Secret, Now: func() time.Time { return time.Now().Add(-7 * time.Hour) }}
	old, _ := expired.UserToken(admin.userID, admin.teamID, admin.email, "", true, 0, "")
	c.want(c.do("GET", "/v1/me", creds{jwt: old}, nil), 401)
	hostTok, _ := c.srv.signer.HostToken("host-x")
	c.want(c.do("GET", "/v1/me", creds{jwt: hostTok}, nil), 401)

	// Password change.
	c.want(c.do("POST", "/v1/me/password", creds{jwt: second.jwt}, map[string]string{"current_password": "nope nope", "new_password": "new password"}), 401)
	c.want(c.do("POST", "/v1/me/password", creds{jwt: second.jwt}, map[string]string{"current_password": "correct horse", "new_password": "new password"}), 204)
	// It ends every session, the one that changed it too.
	if r := c.want(c.do("GET", "/v1/me", creds{jwt: second.jwt}, nil), 401); r.errorCode(t) != "session_ended" {
		t.Fatal(string(r.body))
	}
	var relogged struct {
		Token string `json:"token"`
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "second@example.com", "password": "new password"}), 200).json(t, &relogged)
	second.jwt = relogged.Token

	// A token for a team stops working the moment its holder leaves the team.
	c.want(c.do("POST", "/v1/teams/"+admin.teamID+"/members", creds{jwt: admin.jwt}, map[string]string{"email": "second@example.com"}), 201)
	var switched struct {
		Token string `json:"token"`
	}
	c.want(c.do("POST", "/v1/auth/switch-team", creds{jwt: second.jwt}, map[string]string{"team_id": admin.teamID}), 200).json(t, &switched)
	c.want(c.do("GET", "/v1/me", creds{jwt: switched.Token}, nil), 200)
	c.want(c.do("DELETE", "/v1/teams/"+admin.teamID+"/members/"+second.userID, creds{jwt: admin.jwt}, nil), 204)
	c.want(c.do("GET", "/v1/me", creds{jwt: switched.Token}, nil), 401)
	c.want(c.do("GET", "/v1/me", creds{jwt: second.jwt}, nil), 200)

	// Unknown routes and methods answer JSON errors too.
	if r := c.do("GET", "/v1/nope", creds{}, nil); r.status != 404 || r.errorCode(t) != "not_found" {
		t.Fatalf("unknown route: %d %s", r.status, r.body)
	}
	if r := c.do("PUT", "/v1/capsules", creds{}, nil); r.status != 405 || r.errorCode(t) != "method_not_allowed" {
		t.Fatalf("wrong method: %d %s", r.status, r.body)
	}
}

func TestAPIKeys(t *testing.T) {
	c := newCP(t)
	a := c.signup("keys@example.com")
	var k struct {
		ID        string  `json:"id"`
		Key       string  `json:"key"`
		KeyPrefix string  `json:"key_prefix"`
		LastUsed  *string `json:"last_used"`
	}
	c.want(c.do("POST", "/v1/api-keys", creds{jwt: a.jwt}, map[string]string{"name": "ci"}), 201).json(t, &k)
	if !strings.HasPrefix(k.Key, "wrn_") || len(k.Key) != 36 || !strings.HasPrefix(k.Key, strings.TrimSuffix(k.KeyPrefix, "...")) {
		t.Fatalf("key %q prefix %q", k.Key, k.KeyPrefix)
	}
	// The key works for capsule routes, not for account routes.
	c.want(c.do("GET", "/v1/capsules", creds{key: k.Key}, nil), 200)
	c.want(c.do("GET", "/v1/api-keys", creds{key: k.Key}, nil), 403)
	// It is never shown again, and its use is recorded.
	var keys []map[string]any
	c.want(c.do("GET", "/v1/api-keys", creds{jwt: a.jwt}, nil), 200).json(t, &keys)
	if len(keys) != 1 || keys[0]["key"] != nil || keys[0]["last_used"] == nil {
		t.Fatalf("listing: %v", keys)
	}
	var stored int
	if err := c.st.Pool.QueryRow(t.Context(), "SELECT count(*) FROM api_keys WHERE key_hash = $1", k.Key).Scan(&stored); err != nil || stored != 0 {
		t.Fatalf("the plain key is stored (%d, %v)", stored, err)
	}
	c.want(c.do("DELETE", "/v1/api-keys/"+k.ID, creds{jwt: a.jwt}, nil), 204)
	c.want(c.do("GET", "/v1/capsules", creds{key: k.Key}, nil), 401)
	c.want(c.do("DELETE", "/v1/api-keys/"+k.ID, creds{jwt: a.jwt}, nil), 404)
	c.want(c.do("GET", "/v1/capsules", creds{key: "wrn_" + strings.Repeat("a", 32)}, nil), 401)
	c.want(c.do("GET", "/v1/capsules", creds{key: "nonsense"}, nil), 401)

	// Every change is in the audit log.
	var page struct {
		Entries []struct {
			Action string `json:"action"`
			Status string `json:"status"`
		} `json:"items"`
	}
	c.want(c.do("GET", "/v1/audit-logs", creds{jwt: a.jwt}, nil), 200).json(t, &page)
	var actions []string
	for _, e := range page.Entries {
		actions = append(actions, e.Action)
	}
	if got := strings.Join(actions, ","); !strings.Contains(got, "api_key.revoke") || !strings.Contains(got, "api_key.create") {
		t.Fatalf("audit: %s", got)
	}
	// Upstream's filters and cursor: one action at a time, a page of one
	// leads to the next.
	type auditPage struct {
		Items []struct {
			ID, Action, ResourceType string
		} `json:"items"`
		NextBefore   string `json:"next_before"`
		NextBeforeID string `json:"next_before_id"`
	}
	var creates auditPage
	c.want(c.do("GET", "/v1/audit-logs?action=api_key.create", creds{jwt: a.jwt}, nil), 200).json(t, &creates)
	if len(creates.Items) == 0 || creates.NextBefore != "" {
		t.Fatalf("filtered by action: %+v", creates)
	}
	for _, e := range creates.Items {
		if e.Action != "api_key.create" {
			t.Fatalf("filtered by action: %+v", creates.Items)
		}
	}
	var first, second auditPage
	c.want(c.do("GET", "/v1/audit-logs?resource_type=api_key&action=api_key.create,api_key.revoke&limit=1", creds{jwt: a.jwt}, nil), 200).json(t, &first)
	if len(first.Items) != 1 || first.NextBefore == "" || first.NextBeforeID != first.Items[0].ID {
		t.Fatalf("a page of one: %+v", first)
	}
	c.want(c.do("GET", "/v1/audit-logs?resource_type=api_key&action=api_key.create&action=api_key.revoke&limit=1&before="+url.QueryEscape(first.NextBefore)+"&before_id="+first.NextBeforeID, creds{jwt: a.jwt}, nil), 200).json(t, &second)
	if len(second.Items) != 1 || second.Items[0].ID == first.Items[0].ID {
		t.Fatalf("the next page: %+v after %+v", second, first)
	}
}

func TestRateLimit(t *testing.T) {
	c := newCP(t)
	c.srv.limit = newLimiter(1, 3)
	a := c.signup("rate@example.com")
	key := c.apiKey(a)
	limited := 0
	for range 10 {
		if r := c.do("GET", "/v1/capsules", creds{key: key}, nil); r.status == http.StatusTooManyRequests {
			limited++
			if r.header.Get("Retry-After") == "" || r.errorCode(t) != "rate_limited" {
				t.Fatalf("429 without Retry-After: %s", r.body)
			}
		}
	}
	if limited < 5 {
		t.Fatalf("only %d of 10 fast requests were limited", limited)
	}
}
