package api

import (
	"errors"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/agentca"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// Registration and refresh token lifetimes.
const (
	registrationTTL = time.Hour
	refreshTTL      = 60 * 24 * time.Hour
)

type hostJSON struct {
	ID               string     `json:"id"`
	Type             string     `json:"type"`
	TeamID           *string    `json:"team_id"`
	Provider         *string    `json:"provider"`
	AvailabilityZone *string    `json:"availability_zone"`
	Arch             *string    `json:"arch"`
	CPUCores         *int32     `json:"cpu_cores"`
	MemoryMB         *int32     `json:"memory_mb"`
	DiskGB           *int32     `json:"disk_gb"`
	Address          *string    `json:"address"`
	VMM              *string    `json:"vmm"`
	Version          *string    `json:"version"`
	Status           string     `json:"status"`
	Tags             []string   `json:"tags"`
	LastHeartbeatAt  *time.Time `json:"last_heartbeat_at"`
	CreatedBy        *string    `json:"created_by"`
	CreatedAt        time.Time  `json:"created_at"`
	UpdatedAt        time.Time  `json:"updated_at"`
	// WarmPools is what the host last reported of its warm pools.
	WarmPools []store.WarmPool `json:"warm_pools"`
}

func toHost(h store.Host) hostJSON {
	out := hostJSON{ID: h.ID, Type: h.Type, TeamID: h.TeamID, Provider: h.Provider, AvailabilityZone: h.AvailabilityZone,
		Arch: h.Arch, CPUCores: h.CPUCores, MemoryMB: h.MemoryMB, DiskGB: h.DiskGB, Address: h.Address, VMM: h.VMM,
		Version: h.Version, Status: h.Status, Tags: h.Tags, LastHeartbeatAt: h.LastHeartbeatAt, CreatedBy: h.CreatedBy,
		CreatedAt: h.CreatedAt, UpdatedAt: h.UpdatedAt, WarmPools: h.WarmPools}
	if out.WarmPools == nil {
		out.WarmPools = []store.WarmPool{}
	}
	return out
}

// newRegistrationToken makes a one-time token; only its hash is stored.
func newRegistrationToken() (token, hash string, expires time.Time) {
	token = "wrt_" + auth.RandomString(40)
	return token, auth.HashToken(token), time.Now().Add(registrationTTL)
}

// hostFor loads a host the caller may manage: platform admins any host,
// team owners and admins their team's BYOC hosts; others get 404.
func (s *Server) hostFor(r *http.Request, p *principal) (store.Host, error) {
	h, err := s.st.Host(r.Context(), r.PathValue("id"))
	if errors.Is(err, store.ErrNotFound) {
		return h, notFound("host")
	}
	if err != nil {
		return h, err
	}
	if p.IsAdmin {
		return h, nil
	}
	if h.TeamID == nil || *h.TeamID != p.TeamID {
		return h, notFound("host")
	}
	if p.Role != "owner" && p.Role != "admin" {
		return h, forbidden("managing hosts needs the owner or admin role")
	}
	return h, nil
}

func (s *Server) createHost(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Type             string `json:"type"`
		TeamID           string `json:"team_id"`
		Provider         string `json:"provider"`
		AvailabilityZone string `json:"availability_zone"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	if req.Type == "" {
		req.Type = "regular"
	}
	h := store.Host{ID: ids.New("host"), Type: req.Type, CreatedBy: &p.UserID}
	switch req.Type {
	case "regular":
		if !p.IsAdmin {
			return forbidden("only platform admins can add shared hosts")
		}
	case "byoc":
		if req.TeamID == "" {
			req.TeamID = p.TeamID
		}
		if req.TeamID != p.TeamID && !p.IsAdmin {
			return notFound("team")
		}
		if !p.IsAdmin && p.Role != "owner" && p.Role != "admin" {
			return forbidden("adding a team host needs the owner or admin role")
		}
		t, err := s.st.Team(r.Context(), req.TeamID)
		if errors.Is(err, store.ErrNotFound) {
			return notFound("team")
		}
		if err != nil {
			return err
		}
		if !t.IsBYOC {
			return errf(http.StatusForbidden, "byoc_disabled", "hosts of a team's own (BYOC) are not enabled for this team; a platform admin enables them with PUT /v1/admin/teams/%s/byoc", t.ID)
		}
		h.TeamID = &req.TeamID
	default:
		return badRequest("type must be regular or byoc")
	}
	if len(req.Provider) > 64 || len(req.AvailabilityZone) > 64 {
		return badRequest("provider and availability_zone must be at most 64 characters")
	}
	if req.Provider != "" {
		h.Provider = &req.Provider
	}
	if req.AvailabilityZone != "" {
		h.AvailabilityZone = &req.AvailabilityZone
	}
	token, hash, expires := newRegistrationToken()
	created, err := s.st.CreateHost(r.Context(), h, hash, expires)
	s.audit(r.Context(), p, p.TeamID, "host", h.ID, "host.create", err, map[string]any{"type": req.Type})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, map[string]any{"host": toHost(created), "registration_token": token})
	return nil
}

func (s *Server) listHosts(w http.ResponseWriter, r *http.Request, p *principal) error {
	teamID := p.TeamID
	if p.IsAdmin {
		teamID = ""
	}
	hs, err := s.st.Hosts(r.Context(), teamID)
	if err != nil {
		return err
	}
	out := make([]hostJSON, 0, len(hs))
	for _, h := range hs {
		out = append(out, toHost(h))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getHost(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, toHost(h))
	return nil
}

func (s *Server) regenerateHostToken(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	token, hash, expires := newRegistrationToken()
	err = s.st.NewRegistrationToken(r.Context(), h.ID, hash, expires)
	if errors.Is(err, store.ErrConflict) {
		return conflict("host %s is already registered (%s); only pending hosts get registration tokens", h.ID, h.Status)
	}
	s.audit(r.Context(), p, p.TeamID, "host", h.ID, "host.token", err, nil)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, map[string]any{"host": toHost(h), "registration_token": token})
	return nil
}

var archRE = regexp.MustCompile(`^[a-z0-9_]{1,16}$`)

type hostSpecsJSON struct {
	Arch     string `json:"arch"`
	CPUCores int32  `json:"cpu_cores"`
	MemoryMB int32  `json:"memory_mb"`
	DiskGB   int32  `json:"disk_gb"`
	Address  string `json:"address"`
	VMM      string `json:"vmm"`
	Version  string `json:"version"`
}

// validAgentAddress accepts host:port (plain HTTP/2) or https://host:port
// (an agent serving TLS).
func validAgentAddress(a string) bool {
	host, port, err := net.SplitHostPort(strings.TrimPrefix(a, "https://"))
	if err != nil || host == "" || len(a) > 300 || strings.ContainsAny(host, "/?#@ ") {
		return false
	}
	n, err := strconv.Atoi(port)
	return err == nil && n >= 1 && n <= 65535
}

func (h hostSpecsJSON) validate() error {
	if h.Address == "" {
		return badRequest("address (ip:port of the agent) is required")
	}
	if !validAgentAddress(h.Address) {
		return badRequest("address must be host:port or https://host:port")
	}
	if h.Arch != "" && !archRE.MatchString(h.Arch) {
		return badRequest("arch is not an architecture name")
	}
	if h.CPUCores < 0 || h.MemoryMB < 0 || h.DiskGB < 0 {
		return badRequest("cpu_cores, memory_mb and disk_gb must not be negative")
	}
	if len(h.VMM) > 32 || len(h.Version) > 64 {
		return badRequest("vmm or version too long")
	}
	return nil
}

// mintHost issues a host JWT and a refresh token.
func (s *Server) mintHost(jwt, refresh *string) func(string) (string, string, time.Time, error) {
	return func(hostID string) (string, string, time.Time, error) {
		t, err := s.signer.HostToken(hostID)
		if err != nil {
			return "", "", time.Time{}, err
		}
		*jwt, *refresh = t, "wrr_"+auth.RandomString(40)
		return t, auth.HashToken(*refresh), time.Now().Add(refreshTTL), nil
	}
}

// checkCSR refuses a certificate request this control plane cannot honour,
// before any token is spent on it.
func (s *Server) checkCSR(csr string) error {
	if csr == "" {
		return nil
	}
	if s.cfg.AgentCA == nil {
		return badRequest("this control plane does not run an agent CA (WRENN_AGENT_CA_DIR is unset); start the agent without --managed-tls or give it certificates of your own")
	}
	if err := agentca.CheckRequest([]byte(csr)); err != nil {
		return badRequest("csr: %s", err.Error())
	}
	return nil
}

// certify adds the host's signed certificate and the CA to a token answer
// when the agent sent a certificate request.
func (s *Server) certify(out map[string]any, csr string, h store.Host) error {
	if csr == "" {
		return nil
	}
	cert, err := s.cfg.AgentCA.SignHost([]byte(csr), h.ID, deref(h.Address))
	if err != nil {
		return badRequest("csr: %s", err.Error())
	}
	out["certificate"], out["ca_certificate"] = string(cert), string(s.cfg.AgentCA.CertPEM())
	s.log.Info("agent certificate issued", "host", h.ID, "address", deref(h.Address))
	return nil
}

func (s *Server) registerHost(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		Token    string `json:"token"`
		CSR      string `json:"csr"`
		Protocol string `json:"protocol"`
		hostSpecsJSON
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Token == "" {
		return badRequest("token is required")
	}
	// Refused before the token is spent: an agent of another protocol
	// (upstream Wrenn's has a service of the same name with other field
	// numbers) would garble every call.
	if req.Protocol != hostagentv2connect.HostAgentServiceName {
		s.log.Warn("host registration refused: agent protocol", "protocol", req.Protocol, "remote", r.RemoteAddr)
		return errf(http.StatusBadRequest, "incompatible_agent", "this control plane calls agent protocol %q; the agent speaks %q "+
			"(an upstream Wrenn agent, or another release of wrenn-agent): register a wrenn-agent of this control plane's release",
			hostagentv2connect.HostAgentServiceName, req.Protocol)
	}
	if err := req.validate(); err != nil {
		return err
	}
	if err := s.checkCSR(req.CSR); err != nil {
		return err
	}
	var jwt, refresh string
	// The host's type decides which addresses it may register; the token
	// stays unspent when the address is refused.
	check := func(h store.Host, teamBYOC bool) error {
		if h.Type == "byoc" && !teamBYOC {
			return errf(http.StatusForbidden, "byoc_disabled", "BYOC hosts are not enabled for this host's team; a platform admin enables them")
		}
		if err := s.cfg.HostAddresses.Check(h.Type, req.Address); err != nil {
			s.log.Warn("host registration refused: address", "host", h.ID, "address", req.Address, "remote", r.RemoteAddr, "err", err)
			return badRequest("address: %s", err.Error())
		}
		return nil
	}
	h, err := s.st.RegisterHost(r.Context(), auth.HashToken(req.Token), store.HostSpecs{Arch: req.Arch, CPUCores: req.CPUCores,
		MemoryMB: req.MemoryMB, DiskGB: req.DiskGB, Address: req.Address, VMM: req.VMM, Version: req.Version}, check, s.mintHost(&jwt, &refresh))
	if errors.Is(err, store.ErrNotFound) {
		s.log.Warn("host registration refused: unknown, used or expired token", "remote", r.RemoteAddr)
		return errf(http.StatusUnauthorized, "invalid_token", "the registration token is unknown, already used or expired")
	}
	if err != nil {
		return err
	}
	s.log.Info("host registered", "host", h.ID, "address", req.Address, "cpus", req.CPUCores, "memory_mb", req.MemoryMB, "vmm", req.VMM)
	s.audit(r.Context(), &principal{HostID: h.ID}, deref(h.TeamID), "host", h.ID, "host.register", nil, map[string]any{"address": req.Address})
	out := map[string]any{"host": toHost(h), "token": jwt, "refresh_token": refresh, "protocol": hostagentv2connect.HostAgentServiceName}
	if err := s.certify(out, req.CSR, h); err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (s *Server) refreshHost(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var req struct {
		RefreshToken string `json:"refresh_token"`
		CSR          string `json:"csr"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.RefreshToken == "" {
		return badRequest("refresh_token is required")
	}
	if err := s.checkCSR(req.CSR); err != nil {
		return err
	}
	var jwt, refresh string
	h, err := s.st.RefreshHost(r.Context(), auth.HashToken(req.RefreshToken), s.mintHost(&jwt, &refresh))
	if errors.Is(err, store.ErrNotFound) {
		return errf(http.StatusUnauthorized, "invalid_token", "the refresh token is unknown, revoked or expired")
	}
	if err != nil {
		return err
	}
	s.log.Info("host token refreshed", "host", h.ID)
	out := map[string]any{"host": toHost(h), "token": jwt, "refresh_token": refresh, "protocol": hostagentv2connect.HostAgentServiceName}
	if err := s.certify(out, req.CSR, h); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) heartbeat(w http.ResponseWriter, r *http.Request, p *principal) error {
	if r.PathValue("id") != p.HostID {
		return forbidden("the host token belongs to another host")
	}
	back, err := s.st.Heartbeat(r.Context(), p.HostID)
	if err != nil {
		return err
	}
	if back {
		s.log.Info("host reachable again", "host", p.HostID)
		s.audit(r.Context(), p, "", "host", p.HostID, "host.up", nil, nil)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) liveOnHost(r *http.Request, hostID string) ([]string, []store.Sandbox, error) {
	sbs, err := s.st.Sandboxes(r.Context(), store.SandboxFilter{HostID: hostID, Statuses: store.Live})
	if err != nil {
		return nil, nil, err
	}
	idList := make([]string, 0, len(sbs))
	for _, sb := range sbs {
		idList = append(idList, sb.ID)
	}
	return idList, sbs, nil
}

func (s *Server) hostDeletePreview(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	idList, _, err := s.liveOnHost(r, h.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"host": toHost(h), "sandbox_ids": idList})
	return nil
}

func (s *Server) deleteHost(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	idList, sbs, err := s.liveOnHost(r, h.ID)
	if err != nil {
		return err
	}
	if len(sbs) > 0 {
		if r.URL.Query().Get("force") != "true" {
			e := errf(http.StatusConflict, "host_has_sandboxes", "host %s has %d live capsules; delete with ?force=true to destroy them", h.ID, len(sbs))
			e.extra = map[string]any{"sandbox_ids": idList}
			return e
		}
		for _, sb := range sbs {
			if err := s.destroyOnHost(r.Context(), sb); err != nil {
				return err
			}
		}
		// Whatever the host could not destroy is gone with the host.
		for _, sb := range sbs {
			_, _ = s.st.Transition(r.Context(), sb.ID, []string{"stopping"}, "stopped", map[string]any{"stopped_at": store.Now, "error": "host deleted"})
		}
	}
	err = s.st.DeleteHost(r.Context(), h.ID)
	s.audit(r.Context(), p, deref(h.TeamID), "host", h.ID, "host.delete", err, map[string]any{"capsules_destroyed": len(sbs)})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

var tagRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:=-]{0,62}$`)

func (s *Server) listHostTags(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, h.Tags)
	return nil
}

func (s *Server) addHostTag(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	var req struct {
		Tag string `json:"tag"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if !tagRE.MatchString(req.Tag) {
		return badRequest("tag must be 1-63 characters: letters, digits, . _ : = -")
	}
	err = s.st.AddHostTag(r.Context(), h.ID, req.Tag)
	s.audit(r.Context(), p, deref(h.TeamID), "host", h.ID, "host.tag_add", err, map[string]any{"tag": req.Tag})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) removeHostTag(w http.ResponseWriter, r *http.Request, p *principal) error {
	h, err := s.hostFor(r, p)
	if err != nil {
		return err
	}
	err = s.st.RemoveHostTag(r.Context(), h.ID, r.PathValue("tag"))
	if errors.Is(err, store.ErrNotFound) {
		return notFound("tag")
	}
	s.audit(r.Context(), p, deref(h.TeamID), "host", h.ID, "host.tag_remove", err, map[string]any{"tag": r.PathValue("tag")})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
