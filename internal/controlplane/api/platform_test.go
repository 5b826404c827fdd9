package api

import (
	"net/http"
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Platform admins run capsules of the platform team under
// /v1/admin/capsules and save them as templates every team can use.
func TestPlatformCapsules(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com") // the first user is a platform admin
	bob := c.signup("bob@example.com")
	bobKey := c.apiKey(bob)
	c.startAgent(admin)

	// Only platform admins, and only with their session (not a key).
	c.want(c.do("POST", "/v1/admin/capsules", creds{jwt: bob.jwt}, map[string]any{"memory_mb": 256}), 403)
	c.want(c.do("POST", "/v1/admin/capsules", creds{key: c.apiKey(admin)}, map[string]any{"memory_mb": 256}), 403)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/admin/capsules?wait=true", creds{jwt: admin.jwt}, map[string]any{"memory_mb": 256}), 201).json(t, &sb)
	if rec, err := c.st.Sandbox(t.Context(), store.PlatformTeamID, sb.ID); err != nil || sb.Status != "running" {
		t.Fatalf("platform capsule %+v: %+v %v", sb, rec, err)
	}
	// The admin's own team does not see it; the platform list does.
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{jwt: admin.jwt}, nil), 404)
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: bobKey}, nil), 404)
	var list []capsuleOut
	c.want(c.do("GET", "/v1/admin/capsules", creds{jwt: admin.jwt}, nil), 200).json(t, &list)
	if len(list) != 1 || list[0].ID != sb.ID {
		t.Fatalf("platform list %+v", list)
	}

	// Exec and files act on it as on a team's capsule.
	var out struct {
		Stdout   string `json:"stdout"`
		ExitCode int    `json:"exit_code"`
	}
	c.want(c.do("POST", "/v1/admin/capsules/"+sb.ID+"/exec", creds{jwt: admin.jwt},
		map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo platform > /root/marker; ln -s /root/marker /root/link; cat /root/marker"}}), 200).json(t, &out)
	if out.Stdout != "platform\n" || out.ExitCode != 0 {
		t.Fatalf("exec %+v", out)
	}
	r := c.want(c.do("POST", "/v1/admin/capsules/"+sb.ID+"/files/read", creds{jwt: admin.jwt}, map[string]string{"path": "/root/marker"}), 200)
	if string(r.body) != "platform\n" {
		t.Fatalf("read %q", r.body)
	}
	c.want(c.do("POST", "/v1/admin/capsules/"+sb.ID+"/exec", creds{jwt: bob.jwt}, map[string]any{"cmd": "true"}), 403)
	// Listings say who owns an entry and where a symlink points (a link
	// has its target's type), as upstream's do.
	var ls struct {
		Entries []struct {
			Name, Type, Owner, Group, Permissions string
			SymlinkTarget                         *string `json:"symlink_target"`
		} `json:"entries"`
	}
	c.want(c.do("POST", "/v1/admin/capsules/"+sb.ID+"/files/list", creds{jwt: admin.jwt}, map[string]string{"path": "/root"}), 200).json(t, &ls)
	seen := 0
	for _, e := range ls.Entries {
		switch e.Name {
		case "marker":
			if e.Type != "file" || e.Owner != "root" || e.Group != "root" || e.Permissions != "-rw-r--r--" || e.SymlinkTarget != nil {
				t.Fatalf("file entry %+v", e)
			}
			seen++
		case "link":
			if e.Type != "file" || e.SymlinkTarget == nil || *e.SymlinkTarget != "/root/marker" {
				t.Fatalf("symlink entry %+v", e)
			}
			seen++
		}
	}
	if seen != 2 {
		t.Fatalf("listing %+v", ls)
	}

	// Its snapshot is a template for every team.
	var tpl struct {
		Name   string  `json:"name"`
		TeamID *string `json:"team_id"`
	}
	c.want(c.do("POST", "/v1/admin/capsules/"+sb.ID+"/snapshot", creds{jwt: admin.jwt}, map[string]string{"name": "golden"}), 201).json(t, &tpl)
	if tpl.Name != "golden" || tpl.TeamID != nil {
		t.Fatalf("template %+v", tpl)
	}
	c.want(c.do("POST", "/v1/admin/capsules/"+sb.ID+"/snapshot", creds{jwt: admin.jwt}, map[string]string{"name": "minimal"}), 409)
	var bobs capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: bobKey}, map[string]any{"template": "golden"}), 201).json(t, &bobs)
	c.want(c.do("POST", "/v1/capsules/"+bobs.ID+"/files/read", creds{key: bobKey}, map[string]string{"path": "/root/marker"}), 200)
	c.want(c.do("DELETE", "/v1/capsules/"+bobs.ID, creds{key: bobKey}, nil), 204)

	c.want(c.do("DELETE", "/v1/admin/capsules/"+sb.ID, creds{jwt: bob.jwt}, nil), 403)
	c.want(c.do("DELETE", "/v1/admin/capsules/"+sb.ID, creds{jwt: admin.jwt}, nil), http.StatusNoContent)
}
