package api

import (
	"net/http"
	"strings"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Platform capsules, as upstream Wrenn has them: platform admins run
// capsules of the platform team (store.PlatformTeamID, which has no
// members) under /v1/admin/capsules, with the same operations as a team's
// under /v1/capsules, and save them as templates every team can use.

// platformTwins are the admin routes of the platform team's capsules:
// each capsule route under /v1/capsules/{id} again under
// /v1/admin/capsules/{id}, plus create, list and snapshot.
func platformTwins() []route {
	var out []route
	for _, rt := range routes {
		if !strings.HasPrefix(rt.path, "/v1/capsules/{id}") || rt.access != team {
			continue
		}
		twin := rt
		twin.path = "/v1/admin" + strings.TrimPrefix(rt.path, "/v1")
		twin.access = user
		twin.handler = asPlatform(rt.handler)
		out = append(out, twin)
	}
	return append(out,
		route{method: "POST", path: "/v1/admin/capsules", access: user, handler: asPlatform((*Server).createCapsule)},
		route{method: "POST", path: "/v1/admin/capsules/{id}/snapshot", access: user, handler: asPlatform((*Server).platformSnapshot)},
	)
}

// asPlatform runs h for a platform admin as a member of the platform team.
func asPlatform(h func(*Server, http.ResponseWriter, *http.Request, *principal) error) func(*Server, http.ResponseWriter, *http.Request, *principal) error {
	return func(s *Server, w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := requireAdmin(p); err != nil {
			return err
		}
		admin := *p
		admin.TeamID, admin.Role, admin.Platform = store.PlatformTeamID, "owner", true
		return h(s, w, r, &admin)
	}
}

// platformSnapshot saves a platform capsule as a template every team can
// use; a platform snapshot of the same name is replaced (as upstream).
func (s *Server) platformSnapshot(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	t, err := s.snapshotCapsule(r, p, r.PathValue("id"), req.Name, true, true)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, toTemplate(t))
	return nil
}

// adminListCapsules lists the platform team's capsules (as upstream);
// ?all=true lists every team's.
func (s *Server) adminListCapsules(w http.ResponseWriter, r *http.Request, p *principal) error {
	if err := requireAdmin(p); err != nil {
		return err
	}
	if r.URL.Query().Get("all") == "true" {
		return s.writeCapsules(w, r, "")
	}
	return s.writeCapsules(w, r, store.PlatformTeamID)
}
