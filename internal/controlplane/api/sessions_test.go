package api

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// What ends a user's access ends the sessions they already hold: a
// password change or reset ends every JWT issued before, deactivation too
// (reactivation does not revive them), and removal from a team ends that
// team's tokens even if the user is added back.
func TestSessionsEndWhenAccessEnds(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	u := c.signup("user@example.com")
	loginAs := func(email, password string) string {
		var out struct {
			Token string `json:"token"`
		}
		c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": email, "password": password}), 200).json(t, &out)
		return out.Token
	}
	alive := func(token string) bool { return c.do("GET", "/v1/me", creds{jwt: token}, nil).status == 200 }
	ended := func(what, token string) {
		t.Helper()
		r := c.do("GET", "/v1/me", creds{jwt: token}, nil)
		if r.status != 401 {
			t.Fatalf("%s: a session from before still works (%d)", what, r.status)
		}
	}

	// Two sessions; a password change ends both.
	other := loginAs(u.email, "correct horse")
	c.want(c.do("POST", "/v1/me/password", creds{jwt: u.jwt}, map[string]string{"current_password": "correct horse", "new_password": "second password"}), 204)
	ended("password change (its own session)", u.jwt)
	ended("password change (another session)", other)
	fresh := loginAs(u.email, "second password")
	if !alive(fresh) {
		t.Fatal("a session after the change does not work")
	}

	// A password reset (here by the operator's command; mailed resets take the same path).
	if _, err := c.srv.ResetPassword(context.Background(), u.email, "third password"); err != nil {
		t.Fatal(err)
	}
	ended("password reset", fresh)
	fresh = loginAs(u.email, "third password")

	// Deactivation ends sessions for good; reactivation lets new ones start.
	c.want(c.do("PUT", "/v1/admin/users/"+u.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": false}), 204)
	ended("deactivation", fresh)
	c.want(c.do("PUT", "/v1/admin/users/"+u.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": true}), 204)
	ended("deactivation, after reactivation", fresh)
	fresh = loginAs(u.email, "third password")

	// Removal from a team ends that team's sessions, even once added back.
	c.want(c.do("POST", "/v1/teams/"+admin.teamID+"/members", creds{jwt: admin.jwt}, map[string]string{"email": u.email}), 201)
	var switched struct {
		Token string `json:"token"`
	}
	c.want(c.do("POST", "/v1/auth/switch-team", creds{jwt: fresh}, map[string]string{"team_id": admin.teamID}), 200).json(t, &switched)
	if !alive(switched.Token) {
		t.Fatal("the team session does not work")
	}
	c.want(c.do("DELETE", "/v1/teams/"+admin.teamID+"/members/"+u.userID, creds{jwt: admin.jwt}, nil), 204)
	ended("removal from the team", switched.Token)
	c.want(c.do("POST", "/v1/teams/"+admin.teamID+"/members", creds{jwt: admin.jwt}, map[string]string{"email": u.email}), 201)
	ended("removal from the team, after being added back", switched.Token)
	if !alive(fresh) {
		t.Fatal("removal from one team ended the session of another")
	}
}

// A stream opened before access ended does not outlive it: an event
// stream on a user's session, on a ticket the session got, and on an API
// key, each close within moments of the password change or removal.
func TestStreamsEndWithTheirCredential(t *testing.T) {
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Limits.Recheck = 200 * time.Millisecond
	})
	owner := c.signup("owner@example.com")
	u := c.signup("user@example.com")
	c.want(c.do("POST", "/v1/teams/"+owner.teamID+"/members", creds{jwt: owner.jwt}, map[string]string{"email": u.email}), 201)
	var switched struct {
		Token string `json:"token"`
	}
	c.want(c.do("POST", "/v1/auth/switch-team", creds{jwt: u.jwt}, map[string]string{"team_id": owner.teamID}), 200).json(t, &switched)
	var key struct {
		Key string `json:"key"`
	}
	c.want(c.do("POST", "/v1/api-keys", creds{jwt: switched.Token}, map[string]string{"name": "k"}), 201).json(t, &key)
	var tk struct{ Ticket string }
	c.want(c.do("POST", "/v1/events/token", creds{jwt: switched.Token}, nil), 200).json(t, &tk)

	streams := map[string]<-chan sseFrame{
		"session": openSSE(t, c.url+"/v1/events/stream", http.Header{"Authorization": {"Bearer " + switched.Token}}),
		"ticket":  openSSE(t, c.url+"/v1/events/stream?ticket="+tk.Ticket, http.Header{}),
		"API key": openSSE(t, c.url+"/v1/events/stream", http.Header{"X-Api-Key": {key.Key}}),
	}
	// Still open while the access lasts.
	time.Sleep(600 * time.Millisecond)
	for name, s := range streams {
		select {
		case _, ok := <-s:
			if !ok {
				t.Fatalf("the %s stream closed while its access lasted", name)
			}
		default:
		}
	}
	c.want(c.do("DELETE", "/v1/teams/"+owner.teamID+"/members/"+u.userID, creds{jwt: owner.jwt}, nil), 204)
	for name, s := range streams {
		deadline := time.After(5 * time.Second)
		for open := true; open; {
			select {
			case _, ok := <-s:
				open = ok
			case <-deadline:
				t.Fatalf("the %s stream outlived its access by 5 s", name)
			}
		}
	}
}
