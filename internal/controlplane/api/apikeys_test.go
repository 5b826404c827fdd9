package api

import (
	"strings"
	"testing"
)

// An API key acts for its team only while the user who made it is an
// active member: removal from the team (or leaving it) revokes the
// user's keys for that team, deactivation suspends every key of theirs
// until they are active again, and only a key's creator and the team's
// owners and admins revoke it. Listings say who made each key.
func TestAPIKeysEndWithTheirCreatorsAccess(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com") // the first account: a platform admin
	owner := c.signup("owner@example.com")
	member := c.signup("member@example.com")
	second := c.signup("second@example.com")
	for _, m := range []account{member, second} {
		c.want(c.do("POST", "/v1/teams/"+owner.teamID+"/members", creds{jwt: owner.jwt}, map[string]string{"email": m.email}), 201)
	}
	// The members act in the owner's team.
	inTeam := func(a account) account {
		var out struct {
			Token string `json:"token"`
		}
		c.want(c.do("POST", "/v1/auth/switch-team", creds{jwt: a.jwt}, map[string]string{"team_id": owner.teamID}), 200).json(t, &out)
		a.jwt, a.teamID = out.Token, owner.teamID
		return a
	}
	member, second = inTeam(member), inTeam(second)
	type keyJSON struct {
		ID           string  `json:"id"`
		Key          string  `json:"key"`
		CreatedBy    *string `json:"created_by"`
		CreatorEmail *string `json:"creator_email"`
		Active       bool    `json:"active"`
	}
	newKey := func(a account) keyJSON {
		var k keyJSON
		c.want(c.do("POST", "/v1/api-keys", creds{jwt: a.jwt}, map[string]string{"name": a.email}), 201).json(t, &k)
		return k
	}
	ownerKey, memberKey, secondKey := newKey(owner), newKey(member), newKey(second)
	works := func(key string) int { return c.do("GET", "/v1/capsules", creds{key: key}, nil).status }
	if works(memberKey.Key) != 200 || works(secondKey.Key) != 200 {
		t.Fatal("fresh keys do not work")
	}

	var keys []keyJSON
	c.want(c.do("GET", "/v1/api-keys", creds{jwt: owner.jwt}, nil), 200).json(t, &keys)
	for _, k := range keys {
		if k.CreatedBy == nil || k.CreatorEmail == nil || !k.Active {
			t.Fatalf("listing without its creator: %+v", k)
		}
		if k.ID == memberKey.ID && (*k.CreatedBy != member.userID || *k.CreatorEmail != member.email) {
			t.Fatalf("the member's key lists as %v %v", *k.CreatedBy, *k.CreatorEmail)
		}
	}

	// Members revoke only their own keys.
	c.want(c.do("DELETE", "/v1/api-keys/"+ownerKey.ID, creds{jwt: member.jwt}, nil), 403)
	c.want(c.do("DELETE", "/v1/api-keys/"+secondKey.ID, creds{jwt: member.jwt}, nil), 403)
	if works(ownerKey.Key) != 200 || works(secondKey.Key) != 200 {
		t.Fatal("a refused revoke revoked")
	}
	own := newKey(member)
	c.want(c.do("DELETE", "/v1/api-keys/"+own.ID, creds{jwt: member.jwt}, nil), 204)

	// Removal from the team revokes the member's keys there, at once.
	c.want(c.do("DELETE", "/v1/teams/"+owner.teamID+"/members/"+member.userID, creds{jwt: owner.jwt}, nil), 204)
	r := c.do("GET", "/v1/capsules", creds{key: memberKey.Key}, nil)
	if r.status != 401 {
		t.Fatalf("a removed member's key answered %d", r.status)
	}
	for _, path := range []string{"/v1/capsules/sb-x/exec", "/v1/capsules/sb-x/files/read"} {
		if r := c.do("POST", path, creds{key: memberKey.Key}, map[string]string{"cmd": "id", "path": "/etc/passwd"}); r.status != 401 {
			t.Fatalf("%s with a removed member's key: %d", path, r.status)
		}
	}
	c.want(c.do("GET", "/v1/api-keys", creds{jwt: owner.jwt}, nil), 200).json(t, &keys)
	for _, k := range keys {
		if k.ID == memberKey.ID {
			t.Fatal("the removed member's key is still listed")
		}
	}
	// Adding them back does not bring the key back.
	c.want(c.do("POST", "/v1/teams/"+owner.teamID+"/members", creds{jwt: owner.jwt}, map[string]string{"email": member.email}), 201)
	if works(memberKey.Key) != 401 {
		t.Fatal("a revoked key came back with its creator")
	}

	// Deactivation suspends every key of the user, reactivation restores them.
	c.want(c.do("PUT", "/v1/admin/users/"+second.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": false}), 204)
	if r := c.do("GET", "/v1/capsules", creds{key: secondKey.Key}, nil); r.status != 401 || !strings.Contains(string(r.body), "deactivated") {
		t.Fatalf("a deactivated user's key: %d %s", r.status, r.body)
	}
	c.want(c.do("GET", "/v1/api-keys", creds{jwt: owner.jwt}, nil), 200).json(t, &keys)
	for _, k := range keys {
		if k.ID == secondKey.ID && k.Active {
			t.Fatal("a suspended key lists as active")
		}
	}
	c.want(c.do("PUT", "/v1/admin/users/"+second.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": true}), 204)
	if works(secondKey.Key) != 200 {
		t.Fatal("a reactivated user's key does not work")
	}
	// Leaving the team revokes one's keys too; owners revoke anyone's.
	second = inTeam(c.relogin(second)) // deactivation ended the old session
	c.want(c.do("POST", "/v1/teams/"+owner.teamID+"/leave", creds{jwt: second.jwt}, nil), 204)
	if works(secondKey.Key) != 401 {
		t.Fatal("a key outlived its creator leaving the team")
	}
	again := newKey(inTeam(c.relogin(member)))
	c.want(c.do("DELETE", "/v1/api-keys/"+again.ID, creds{jwt: owner.jwt}, nil), 204)
	if works(again.Key) != 401 {
		t.Fatal("the owner's revoke did not take")
	}
}

// relogin returns the account with a fresh token for its own team.
func (c *cp) relogin(m account) account {
	c.t.Helper()
	var a struct {
		Token string `json:"token"`
	}
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": m.email, "password": "correct horse"}), 200).json(c.t, &a)
	m.jwt = a.Token
	return m
}
