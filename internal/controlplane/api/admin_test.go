package api

import (
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Platform admins manage users, teams and templates across teams; nobody
// else reaches those routes.
func TestAdminRoutes(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com") // the first user is a platform admin
	bob := c.signup("bob@example.com")
	bobKey := c.apiKey(bob)
	if _, err := c.st.InsertSandbox(t.Context(), store.Sandbox{ID: "sb-bobscapsule000001", TeamID: bob.teamID, Template: "minimal", Status: "paused", VCPUs: 1, MemoryMB: 256}); err != nil {
		t.Fatal(err)
	}

	// Every admin route refuses a non-admin with 403.
	for _, rt := range routes {
		if !strings.HasPrefix(rt.path, "/v1/admin/") || rt.access != user {
			continue
		}
		path := strings.NewReplacer("{id}", bob.userID, "{name}", "minimal").Replace(rt.path)
		if got := c.do(rt.method, path, creds{jwt: bob.jwt}, map[string]any{"admin": true, "active": true, "name": "x", "commands": []string{"true"}}); got.status != 403 {
			t.Errorf("%s %s as a non-admin: %d %s", rt.method, path, got.status, got.body)
		}
	}

	// Pages as upstream Wrenn's: the items with total, page, per_page, total_pages.
	var users struct {
		Users []struct {
			ID, Email, Status string
			IsAdmin           bool `json:"is_admin"`
			TeamsJoined       int  `json:"teams_joined"`
			TeamsOwned        int  `json:"teams_owned"`
		}
	}
	c.want(c.do("GET", "/v1/admin/users", creds{jwt: admin.jwt}, nil), 200).json(t, &users)
	if len(users.Users) != 2 || !users.Users[0].IsAdmin || users.Users[1].IsAdmin || users.Users[1].TeamsJoined != 1 || users.Users[1].TeamsOwned != 1 {
		t.Fatalf("users: %+v", users)
	}
	var page struct {
		Users       []struct{ Email string }
		Total, Page int
		PerPage     int `json:"per_page"`
		TotalPages  int `json:"total_pages"`
	}
	c.want(c.do("GET", "/v1/admin/users?page=2&per_page=1", creds{jwt: admin.jwt}, nil), 200).json(t, &page)
	if len(page.Users) != 1 || page.Users[0].Email != "bob@example.com" || page.Total != 2 || page.Page != 2 || page.TotalPages != 2 {
		t.Fatalf("page 2 of 1 a page: %+v", page)
	}
	for _, bad := range []string{"?page=0", "?page=x", "?per_page=101", "?per_page=0"} {
		c.want(c.do("GET", "/v1/admin/users"+bad, creds{jwt: admin.jwt}, nil), 400)
	}
	// The last admin stays an admin; a second admin can be made and unmade.
	c.want(c.do("PUT", "/v1/admin/users/"+admin.userID+"/admin", creds{jwt: admin.jwt}, map[string]bool{"admin": false}), 409)
	c.want(c.do("PUT", "/v1/admin/users/"+bob.userID+"/admin", creds{jwt: admin.jwt}, map[string]bool{"admin": true}), 204)
	c.want(c.do("GET", "/v1/admin/users", creds{jwt: bob.jwt}, nil), 200) // checked against the database, not the token
	c.want(c.do("PUT", "/v1/admin/users/"+bob.userID+"/admin", creds{jwt: admin.jwt}, map[string]bool{"admin": false}), 204)
	c.want(c.do("GET", "/v1/admin/users", creds{jwt: bob.jwt}, nil), 403)
	c.want(c.do("PUT", "/v1/admin/users/"+bob.userID+"/admin", creds{jwt: admin.jwt}, map[string]any{}), 400)
	c.want(c.do("PUT", "/v1/admin/users/usr-nobody/admin", creds{jwt: admin.jwt}, map[string]bool{"admin": true}), 404)

	// A disabled account cannot log in; admins cannot disable themselves.
	c.want(c.do("PUT", "/v1/admin/users/"+bob.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": false}), 204)
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "bob@example.com", "password": "correct horse"}), 403)
	c.want(c.do("PUT", "/v1/admin/users/"+bob.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": true}), 204)
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "bob@example.com", "password": "correct horse"}), 200)
	c.want(c.do("PUT", "/v1/admin/users/"+admin.userID+"/active", creds{jwt: admin.jwt}, map[string]bool{"active": false}), 409)

	// Across teams: capsules, templates, audit.
	var caps []capsuleOut
	c.want(c.do("GET", "/v1/admin/capsules?all=true", creds{jwt: admin.jwt}, nil), 200).json(t, &caps)
	if len(caps) != 1 || caps[0].ID != "sb-bobscapsule000001" {
		t.Fatalf("admin capsules: %+v", caps)
	}
	c.want(c.do("DELETE", "/v1/admin/templates/minimal", creds{jwt: admin.jwt}, nil), 409)
	c.want(c.do("DELETE", "/v1/admin/templates/nope", creds{jwt: admin.jwt}, nil), 404)
	var audit struct {
		Entries []struct {
			Action string  `json:"action"`
			TeamID *string `json:"team_id"`
			Scope  string  `json:"scope"`
		} `json:"items"`
	}
	c.want(c.do("GET", "/v1/admin/audit-logs?limit=200", creds{jwt: admin.jwt}, nil), 200).json(t, &audit)
	actions := ""
	for _, e := range audit.Entries {
		actions += e.Action + " "
	}
	if !strings.Contains(actions, "user.set_admin") || !strings.Contains(actions, "api_key.create") || audit.Entries[0].Scope != "platform" {
		t.Fatalf("platform audit: %s", actions)
	}

	// Deleting a team destroys its capsules and ends its keys.
	var teams struct {
		Teams []struct {
			ID                 string
			OwnerEmail         string `json:"owner_email"`
			MemberCount        int    `json:"member_count"`
			ActiveSandboxCount int    `json:"active_sandbox_count"`
		}
		Total int
	}
	c.want(c.do("GET", "/v1/admin/teams", creds{jwt: admin.jwt}, nil), 200).json(t, &teams)
	if len(teams.Teams) != 3 || teams.Total != 3 { // the two accounts' and the platform team
		t.Fatalf("teams: %+v", teams)
	}
	for _, tm := range teams.Teams {
		if tm.ID == bob.teamID && (tm.OwnerEmail != "bob@example.com" || tm.MemberCount != 1 || tm.ActiveSandboxCount != 1) {
			t.Fatalf("bob's team: %+v", tm)
		}
	}
	c.want(c.do("DELETE", "/v1/admin/teams/team-platform", creds{jwt: admin.jwt}, nil), 409)
	c.want(c.do("DELETE", "/v1/admin/teams/"+bob.teamID, creds{jwt: admin.jwt}, nil), 204)
	c.want(c.do("GET", "/v1/capsules", creds{key: bobKey}, nil), 401)
	sb, err := c.st.Sandbox(t.Context(), "", "sb-bobscapsule000001")
	if err != nil || sb.Status != "stopped" {
		t.Fatalf("the deleted team's capsule: %+v %v", sb.Status, err)
	}
	c.want(c.do("DELETE", "/v1/admin/teams/"+bob.teamID, creds{jwt: admin.jwt}, nil), 404)
}
