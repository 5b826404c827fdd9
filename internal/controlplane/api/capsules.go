package api

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/ingress"
	"github.com/wrenn/wrenn/internal/controlplane/scheduler"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/egress"
	"github.com/wrenn/wrenn/internal/envvars"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

type capsuleJSON struct {
	ID           string            `json:"id"`
	Status       string            `json:"status"`
	Template     string            `json:"template"`
	VCPUs        int32             `json:"vcpus"`
	MemoryMB     int32             `json:"memory_mb"`
	DiskSizeMB   *int32            `json:"disk_size_mb"`
	TimeoutSec   int32             `json:"timeout_sec"`
	AutoPause    bool              `json:"auto_pause"`
	GuestIP      string            `json:"guest_ip"`
	HostIP       string            `json:"host_ip"`
	HostID       *string           `json:"host_id,omitempty"`
	CreatedAt    time.Time         `json:"created_at"`
	StartedAt    *time.Time        `json:"started_at"`
	LastActiveAt *time.Time        `json:"last_active_at"`
	LastUpdated  time.Time         `json:"last_updated"`
	Metadata     map[string]string `json:"metadata"`
	Egress       store.Egress      `json:"egress"`
	StatusReason string            `json:"status_reason,omitempty"`
	// StatusDetail is the capsule's own state, finer than Status while it
	// changes: pausing, resuming, stopping.
	StatusDetail string `json:"status_detail"`
	// StartedFrom is "memory" (restored from its template's memory) or
	// "boot"; BootNote says why one whose template has memory booted.
	StartedFrom string `json:"started_from,omitempty"`
	BootNote    string `json:"boot_note,omitempty"`
	Public      bool   `json:"public"`
	AutoResume  bool   `json:"auto_resume"`
	// Domain and URLScheme make the capsule's port URLs:
	// <scheme>://<port>-<id>.<domain>.
	Domain    string `json:"domain"`
	URLScheme string `json:"url_scheme"`
	// The team's credentials for reaching the capsule directly (only on
	// GET /v1/capsules/{id} and a create that waited).
	EnvdAccessToken    string `json:"envd_access_token,omitempty"`
	TrafficAccessToken string `json:"traffic_access_token,omitempty"`
}

func (s *Server) toCapsule(sb store.Sandbox) capsuleJSON {
	return capsuleJSON{ID: sb.ID, Status: publicStatus(sb.Status), StatusDetail: sb.Status, Template: sb.Template, VCPUs: sb.VCPUs, MemoryMB: sb.MemoryMB,
		DiskSizeMB: sb.DiskSizeMB, TimeoutSec: sb.TimeoutSec, AutoPause: sb.AutoPause, GuestIP: sb.GuestIP, HostIP: sb.HostIP,
		HostID: sb.HostID, CreatedAt: sb.CreatedAt, StartedAt: sb.StartedAt, LastActiveAt: sb.LastActiveAt,
		LastUpdated: sb.LastUpdated, Metadata: sb.Metadata, Egress: sb.Egress, StatusReason: sb.Error,
		Public: sb.Public, AutoResume: sb.AutoResume, Domain: s.cfg.IngressDomain, URLScheme: s.cfg.IngressScheme,
		StartedFrom: sb.StartedFrom, BootNote: sb.BootNote}
}

// publicStatus is a capsule's state in the set upstream Wrenn's API and
// SDKs know (pending, starting, running, paused, hibernated, stopped,
// missing, error): a pause in progress is paused already (as upstream
// marks it), a resume is starting, a destroy is stopped.
func publicStatus(s string) string {
	switch s {
	case "pausing":
		return "paused"
	case "resuming":
		return "starting"
	case "stopping":
		return "stopped"
	}
	return s
}

// withTokens adds the capsule's tokens, for its own team.
func (s *Server) withTokens(ctx context.Context, c capsuleJSON) (capsuleJSON, error) {
	t, err := s.st.SandboxTokens(ctx, c.ID)
	if err != nil {
		return c, err
	}
	c.EnvdAccessToken, c.TrafficAccessToken = t.Envd, t.Traffic
	return c, nil
}

// checkEgress validates an egress policy as the agents enforce it.
func checkEgress(e *store.Egress) error {
	if e.Mode == "" {
		e.Mode = "allow_all"
	}
	var policy egress.Policy
	policy.Mode = egress.Mode(e.Mode)
	for _, list := range []struct {
		in  []string
		out *[]netip.Prefix
	}{{e.Allow, &policy.Allow}, {e.Deny, &policy.Deny}} {
		for _, c := range list.in {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				a, aerr := netip.ParseAddr(c)
				if aerr != nil {
					return badRequest("egress: %q is not an IPv4 CIDR or address", c)
				}
				p = netip.PrefixFrom(a, a.BitLen())
			}
			*list.out = append(*list.out, p)
		}
	}
	if err := policy.Validate(); err != nil {
		return badRequest("egress: %s", err.Error())
	}
	return nil
}

// egressProto is the agent's form of a policy checkEgress accepted.
func egressProto(e store.Egress) *pb.EgressPolicy {
	out := &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_ALL, AllowCidrs: e.Allow, DenyCidrs: e.Deny}
	switch e.Mode {
	case "deny_all":
		out.Mode = pb.EgressPolicy_MODE_DENY_ALL
	case "allow_list":
		out.Mode = pb.EgressPolicy_MODE_ALLOW_LIST
	}
	return out
}

// Limits on what one capsule may ask for.
const (
	maxVCPUs      = 16
	maxMemoryMB   = 64 * 1024
	maxDiskMB     = 512 * 1024
	maxTimeoutSec = 30 * 24 * 3600
	maxMetadata   = 64
)

var templateNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

type createCapsuleRequest struct {
	Template   string            `json:"template"`
	VCPUs      *int              `json:"vcpus"`
	MemoryMB   *int              `json:"memory_mb"`
	DiskSizeMB *int              `json:"disk_size_mb"`
	TimeoutSec *int              `json:"timeout_sec"`
	AutoPause  *bool             `json:"auto_pause"`
	Envs       map[string]string `json:"envs"`
	Metadata   map[string]string `json:"metadata"`
	HostTags   []string          `json:"host_tags"`
	// BYOC places the capsule on one of the team's own hosts (a team a
	// platform admin enabled for BYOC), false on shared hosts; unset, a
	// BYOC team's capsules go to its own hosts, as upstream Wrenn's.
	BYOC *bool `json:"byoc"`
	// Egress is what the capsule may reach (default: the public internet).
	Egress store.Egress `json:"egress"`
	// Public opens the capsule's ports to anyone through the ingress;
	// otherwise they need the team's credentials or the traffic token.
	Public bool `json:"public"`
	// AutoResume resumes the capsule, when paused, on ingress traffic.
	AutoResume bool `json:"auto_resume"`

	// endAt is an absolute deadline (the E2B API's timeout).
	endAt *time.Time
	// shapeDefaulted: no vcpus or memory_mb was asked for, so a snapshot
	// template's own shape applies (it starts from its memory then).
	shapeDefaulted bool
}

func (req *createCapsuleRequest) validate() error {
	if req.Template == "" {
		req.Template = "minimal"
	}
	if !templateNameRE.MatchString(req.Template) {
		return badRequest("template must be a template name")
	}
	intIn := func(v **int, def, lo, hi int, name string) error {
		if *v == nil {
			*v = &def
		}
		if **v < lo || **v > hi {
			return badRequest("%s must be between %d and %d", name, lo, hi)
		}
		return nil
	}
	req.shapeDefaulted = req.VCPUs == nil && req.MemoryMB == nil
	if err := intIn(&req.VCPUs, 1, 1, maxVCPUs, "vcpus"); err != nil {
		return err
	}
	if err := intIn(&req.MemoryMB, 512, 128, maxMemoryMB, "memory_mb"); err != nil {
		return err
	}
	if err := intIn(&req.DiskSizeMB, 0, 0, maxDiskMB*64, "disk_size_mb"); err != nil { // the platform's own maximum is checked at placement
		return err
	}
	if err := intIn(&req.TimeoutSec, 0, 0, maxTimeoutSec, "timeout_sec"); err != nil {
		return err
	}
	if *req.TimeoutSec > 0 && *req.TimeoutSec < 60 {
		*req.TimeoutSec = 60 // as documented: shorter positive timeouts are raised to 60 s
	}
	if req.AutoPause == nil {
		t := true
		req.AutoPause = &t
	}
	if len(req.Metadata) > maxMetadata {
		return badRequest("at most %d metadata pairs", maxMetadata)
	}
	for k, v := range req.Metadata {
		if k == "" || len(k) > 128 || len(v) > 1024 {
			return badRequest("metadata keys must be 1-128 bytes and values at most 1024")
		}
	}
	if err := envvars.Validate(req.Envs); err != nil {
		return badRequest("%s", err.Error())
	}
	return checkEgress(&req.Egress)
}

// agentTemplate is the name a template has on its host: images shipped
// with every host by name, templates made on a host by ID (names are only
// unique within a team).
func agentTemplate(t store.Template) string {
	if t.Type == "base" && t.HostID == nil {
		return t.Name // shipped on every host (minimal)
	}
	return t.ID // made on one host: snapshots and builds
}

func (s *Server) createCapsule(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req createCapsuleRequest
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	if err := req.validate(); err != nil {
		return err
	}
	ctx := r.Context()
	sb, tpl, sreq, err := s.place(ctx, p, req)
	if err != nil {
		return err
	}
	done := make(chan struct{})
	var createErr error // read after done closes
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		defer close(done)
		createErr = s.runCreate(sb, tpl, req.Envs, sreq, p)
	}()
	// ?wait=true answers when the capsule is running (or failed).
	if r.URL.Query().Get("wait") == "true" {
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
		cur, err := s.st.Sandbox(ctx, p.TeamID, sb.ID)
		if err != nil {
			return err
		}
		if cur.Status == "error" {
			if connect.CodeOf(createErr) == connect.CodeResourceExhausted {
				return errf(http.StatusServiceUnavailable, "host_full", "capsule %s failed to start: no host had room: %s", cur.ID, cur.Error)
			}
			return errf(http.StatusBadGateway, "create_failed", "capsule %s failed to start: %s", cur.ID, cur.Error)
		}
		out, err := s.withTokens(ctx, s.toCapsule(cur))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, out)
		return nil
	}
	writeJSON(w, http.StatusAccepted, s.toCapsule(sb))
	return nil
}

// place checks the template, picks a host and records the capsule as
// starting on it (the stored row is returned); runCreate then boots it.
func (s *Server) place(ctx context.Context, p *principal, req createCapsuleRequest) (store.Sandbox, store.Template, scheduler.Request, error) {
	var none store.Sandbox
	tpl, err := s.st.TemplateByName(ctx, p.TeamID, req.Template)
	if errors.Is(err, store.ErrNotFound) {
		return none, tpl, scheduler.Request{}, badRequest("template %q does not exist", req.Template)
	}
	if err != nil {
		return none, tpl, scheduler.Request{}, err
	}
	hosts, teamBYOC, err := s.st.SchedulableHosts(ctx, p.TeamID)
	if err != nil {
		return none, tpl, scheduler.Request{}, err
	}
	if req.shapeDefaulted && tpl.VCPUs != nil && tpl.MemoryMB != nil {
		v, m := int(*tpl.VCPUs), int(*tpl.MemoryMB)
		req.VCPUs, req.MemoryMB = &v, &m
	}
	byoc := teamBYOC
	switch {
	case req.BYOC != nil:
		byoc = *req.BYOC
	case len(hosts) == 0:
		// No host listed tells nothing of the team: look, so the error
		// names the hosts it lacks.
		team, err := s.st.Team(ctx, p.TeamID)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return none, tpl, scheduler.Request{}, err
		}
		byoc = team.IsBYOC
	}
	sreq := scheduler.Request{VCPUs: *req.VCPUs, MemoryMB: *req.MemoryMB, Tags: req.HostTags, BYOC: byoc, Template: agentTemplate(tpl)}
	if tpl.HostID != nil {
		sreq.HostID = *tpl.HostID
	}
	h, err := scheduler.Pick(hosts, sreq)
	if err != nil {
		s.audit(ctx, p, p.TeamID, "capsule", "", "capsule.create", err, nil)
		return none, tpl, sreq, errf(http.StatusServiceUnavailable, "no_capacity", "%s", err.Error())
	}
	disk := *req.DiskSizeMB
	if disk == 0 {
		disk = max(s.cfg.DefaultDiskMB, int((tpl.SizeBytes+1<<20-1)>>20))
	}
	if disk > s.cfg.MaxDiskMB {
		return none, tpl, sreq, badRequest("disk_size_mb %d is more than this platform's maximum of %d", disk, s.cfg.MaxDiskMB)
	}
	*req.DiskSizeMB = disk
	sreq.DiskMB = disk
	sb := store.Sandbox{ID: ids.New("sb"), TeamID: p.TeamID, HostID: &h.ID, Template: req.Template, Status: "starting",
		VCPUs: int32(*req.VCPUs), MemoryMB: int32(*req.MemoryMB), TimeoutSec: int32(*req.TimeoutSec), AutoPause: *req.AutoPause,
		Metadata: req.Metadata, Egress: req.Egress, Public: req.Public, AutoResume: req.AutoResume, EndAt: req.endAt, DefaultUser: tpl.DefaultUser}
	if *req.DiskSizeMB > 0 {
		d := int32(*req.DiskSizeMB)
		sb.DiskSizeMB = &d
	}
	actor, _ := p.actor()
	sb.CreatedBy = &actor
	stored, err := s.st.InsertSandboxWithin(ctx, sb, s.cfg.Quotas)
	if err != nil {
		s.audit(ctx, p, p.TeamID, "capsule", sb.ID, "capsule.create", err, nil)
		return none, tpl, sreq, err
	}
	s.log.Info("capsule placed", "capsule", sb.ID, "team", sb.TeamID, "host", h.ID, "template", sb.Template)
	return stored, tpl, sreq, nil
}

// StartCapsule creates a capsule for a background job of the control
// plane (a template build) on behalf of a team member, and returns it
// once it runs.
func (s *Server) StartCapsule(ctx context.Context, teamID, userID, template string, vcpus, memoryMB, diskMB int, envs, metadata map[string]string) (store.Sandbox, error) {
	zero, no := 0, false
	req := createCapsuleRequest{Template: template, VCPUs: &vcpus, MemoryMB: &memoryMB, DiskSizeMB: &diskMB, TimeoutSec: &zero, AutoPause: &no, Envs: envs, Metadata: metadata}
	if err := req.validate(); err != nil {
		return store.Sandbox{}, err
	}
	p := &principal{TeamID: teamID, UserID: userID}
	sb, tpl, sreq, err := s.place(ctx, p, req)
	if err != nil {
		return sb, err
	}
	s.runCreate(sb, tpl, envs, sreq, p)
	cur, err := s.st.Sandbox(context.WithoutCancel(ctx), teamID, sb.ID)
	if err != nil {
		return cur, err
	}
	if cur.Status != "running" {
		return cur, fmt.Errorf("capsule %s did not start: %s", cur.ID, cur.Error)
	}
	return cur, nil
}

// DestroyCapsule destroys a capsule for a background job.
func (s *Server) DestroyCapsule(ctx context.Context, sb store.Sandbox) error {
	return s.destroyOnHost(ctx, sb)
}

// AgentFor returns the client of a host that can take calls.
func (s *Server) AgentFor(ctx context.Context, hostID string) (agentclient.Client, error) {
	c, _, err := s.agentFor(ctx, hostID)
	return c, err
}

// runCreate boots the capsule on its host; if the host cannot be reached
// or has no room (memory, disk) it tries up to two other hosts. It always
// leaves the record running or in error, never half made, and returns the
// last host's error when it failed.
func (s *Server) runCreate(sb store.Sandbox, tpl store.Template, envs map[string]string, sreq scheduler.Request, p *principal) error {
	ctx, cancel := context.WithTimeout(s.bgCtx, s.cfg.CreateTimeout)
	defer cancel()
	hostID := *sb.HostID
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			sreq.Exclude = append(sreq.Exclude, hostID)
			hosts, _, err := s.st.SchedulableHosts(ctx, sb.TeamID)
			if err != nil {
				lastErr = err
				break
			}
			h, err := scheduler.Pick(hosts, sreq)
			if err != nil {
				break
			}
			if _, err := s.st.Transition(ctx, sb.ID, []string{"starting"}, "starting", map[string]any{"host_id": h.ID}); err != nil {
				lastErr = err
				break
			}
			s.log.Warn("retrying capsule create on another host", "capsule", sb.ID, "failed_host", hostID, "host", h.ID, "err", lastErr)
			hostID = h.ID
		}
		c, h, err := s.agentFor(ctx, hostID)
		if err != nil {
			lastErr = err
			continue
		}
		timeout := int32(maxTimeoutSec) // the control plane enforces inactivity; the agent's deadline is a backstop
		in := &pb.CreateSandboxRequest{Id: sb.ID, Template: agentTemplate(tpl), Vcpus: sb.VCPUs, MemoryMib: sb.MemoryMB,
			TimeoutSeconds: timeout, AutoPause: true, EnvVars: withDefaults(tpl.DefaultEnv, envs), Metadata: sb.Metadata, Egress: egressProto(sb.Egress)}
		if sb.DiskSizeMB != nil {
			in.DiskSizeMib = *sb.DiskSizeMB
		}
		resp, err := c.CreateSandbox(ctx, connect.NewRequest(in))
		if err == nil {
			cur, terr := s.st.Transition(context.WithoutCancel(ctx), sb.ID, []string{"starting"}, "running", startedColumns(resp.Msg))
			if terr != nil {
				// Destroyed while starting: do not leave a VM behind.
				s.log.Warn("capsule changed state while starting; destroying it on the host", "capsule", sb.ID, "status", cur.Status, "err", terr)
				_, _ = c.DestroySandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.ID}))
				return terr
			}
			s.log.Info("capsule running", "capsule", sb.ID, "host", h.ID, "address", cur.HostIP)
			s.audit(ctx, p, sb.TeamID, "capsule", sb.ID, "capsule.create", nil, map[string]any{"host_id": h.ID, "template": sb.Template})
			return nil
		}
		lastErr = err
		if code := connect.CodeOf(err); code != connect.CodeUnavailable && code != connect.CodeResourceExhausted {
			break // the host answered about the request: another host would fail the same way
		}
	}
	msg := "no host could start the capsule"
	switch {
	case connect.CodeOf(lastErr) == connect.CodeUnavailable && !neverSent(lastErr):
		msg = fmt.Sprintf("the agent on host %s stopped answering while it started the capsule (%s)", hostID, agentclient.Message(lastErr))
	case lastErr != nil:
		msg = agentclient.Message(lastErr)
	}
	s.log.Error("capsule create failed", "capsule", sb.ID, "err", msg)
	_, _ = s.st.Transition(context.WithoutCancel(ctx), sb.ID, []string{"starting"}, "error", map[string]any{"error": msg, "stopped_at": store.Now})
	s.audit(ctx, p, sb.TeamID, "capsule", sb.ID, "capsule.create", errors.New(msg), nil)
	if lastErr == nil {
		lastErr = errors.New(msg)
	}
	return lastErr
}

// startedColumns are what a capsule's row records once its host has
// started it.
func startedColumns(r *pb.CreateSandboxResponse) map[string]any {
	return map[string]any{
		"host_ip": r.GetSandbox().GetAddress(), "guest_ip": "169.254.0.21", "started_at": store.Now, "last_active_at": store.Now, "error": "",
		"envd_token": store.Secret(r.GetEnvdAccessToken()), "started_from": r.GetSandbox().GetStartedFrom(), "boot_note": r.GetSandbox().GetBootNote()}
}

// agentFor returns the client of a host that can take calls.
func (s *Server) agentFor(ctx context.Context, hostID string) (agentclient.Client, store.Host, error) {
	h, err := s.st.Host(ctx, hostID)
	if err != nil {
		return nil, h, err
	}
	if h.Address == nil || h.AgentToken == nil {
		return nil, h, connect.NewError(connect.CodeUnavailable, fmt.Errorf("host %s is not registered", h.ID))
	}
	if h.Status == "unreachable" || h.Status == "offline" {
		return nil, h, connect.NewError(connect.CodeUnavailable, fmt.Errorf("host %s is %s", h.ID, h.Status))
	}
	if err := s.cfg.HostAddresses.Check(h.Type, *h.Address); err != nil {
		// Registered before the rules, or the operator narrowed them: not dialled.
		s.log.Warn("not calling a host at an address the rules refuse", "host", h.ID, "address", *h.Address, "err", err)
		return nil, h, connect.NewError(connect.CodeUnavailable, fmt.Errorf("host %s is at an address the control plane does not call", h.ID))
	}
	return s.agents.Get(h.ID, *h.Address, *h.AgentToken), h, nil
}

// capsule loads one of the caller's capsules (another team's is 404).
func (s *Server) capsule(r *http.Request, p *principal) (store.Sandbox, error) {
	id := r.PathValue("id")
	if !ids.Valid("sb", id) {
		return store.Sandbox{}, notFound("capsule")
	}
	sb, err := s.st.Sandbox(r.Context(), p.TeamID, id)
	if errors.Is(err, store.ErrNotFound) {
		return sb, notFound("capsule")
	}
	return sb, err
}

// running loads a capsule that must be running, waiting while it starts
// or resumes (clients may call right after create), and returns its agent.
func (s *Server) running(r *http.Request, p *principal) (store.Sandbox, agentclient.Client, error) {
	ctx := r.Context()
	deadline := time.Now().Add(s.cfg.CreateTimeout)
	for {
		sb, err := s.capsule(r, p)
		if err != nil {
			return sb, nil, err
		}
		if sb.HostID == nil && sb.Status != "error" && sb.Status != "stopped" {
			return sb, nil, errf(http.StatusConflict, "invalid_state", "capsule %s is on no host", sb.ID)
		}
		switch sb.Status {
		case "running":
			c, _, err := s.agentFor(ctx, *sb.HostID)
			if err == nil {
				_ = s.st.Touch(ctx, sb.ID)
			}
			return sb, c, err
		case "starting", "resuming", "pending":
			if time.Now().After(deadline) {
				return sb, nil, conflict("capsule %s is still %s", sb.ID, sb.Status)
			}
			select {
			case <-ctx.Done():
				return sb, nil, ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		default:
			return sb, nil, errf(http.StatusConflict, "invalid_state", "capsule %s is %s, not running", sb.ID, sb.Status)
		}
	}
}

func (s *Server) listCapsules(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.writeCapsules(w, r, p.TeamID)
}

// maxCapsulePage is the most capsules one list answer holds.
const maxCapsulePage = 1000

// writeCapsules lists a team's capsules ("" every team's), newest first,
// with the status= and metadata.KEY= filters, paged: limit= (at most
// maxCapsulePage, the default) and next_token=, the X-Next-Token header of
// the page before, which is set whenever more capsules follow.
func (s *Server) writeCapsules(w http.ResponseWriter, r *http.Request, teamID string) error {
	q := r.URL.Query()
	limit := maxCapsulePage
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxCapsulePage {
			return badRequest("limit must be between 1 and %d", maxCapsulePage)
		}
		limit = n
	}
	f := store.SandboxFilter{TeamID: teamID, Limit: limit + 1}
	if tok := q.Get("next_token"); tok != "" {
		c, err := parseCursor(tok)
		if err != nil {
			return badRequest("invalid next_token: pass the X-Next-Token of the page before")
		}
		f.After = &c
	}
	if v := q.Get("status"); v != "" {
		for _, st := range strings.Split(v, ",") {
			if !validStatus(st) {
				return badRequest("unknown status %q", st)
			}
			f.Statuses = append(f.Statuses, st)
		}
	} else {
		f.Statuses = append(append([]string{}, store.Live...), "hibernated", "missing")
	}
	for key, vals := range q {
		if k, ok := strings.CutPrefix(key, "metadata."); ok && k != "" {
			if f.Metadata == nil {
				f.Metadata = map[string]string{}
			}
			f.Metadata[k] = vals[0]
		}
	}
	sbs, err := s.st.Sandboxes(r.Context(), f)
	if err != nil {
		return err
	}
	if len(sbs) > limit {
		last := sbs[limit-1]
		w.Header().Set("X-Next-Token", makeCursor(store.Cursor{CreatedAt: last.CreatedAt, ID: last.ID}))
		sbs = sbs[:limit]
	}
	out := make([]capsuleJSON, 0, len(sbs))
	for _, sb := range sbs {
		out = append(out, s.toCapsule(sb))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func validStatus(s string) bool {
	switch s {
	case "pending", "starting", "running", "pausing", "paused", "resuming", "stopping", "hibernated", "stopped", "missing", "error":
		return true
	}
	return false
}

func (s *Server) getCapsule(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, err := s.capsule(r, p)
	if err != nil {
		return err
	}
	out, err := s.withTokens(r.Context(), s.toCapsule(sb))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// portJSON is a port a server in the capsule listens on, with its URL.
type portJSON struct {
	Port      uint32   `json:"port"`
	Addresses []string `json:"addresses"`
	// Forwarded: the server listens on loopback only; the ingress reaches
	// it through envd's forward.
	Forwarded bool   `json:"forwarded"`
	PID       int32  `json:"pid,omitempty"`
	Command   string `json:"command,omitempty"`
	URL       string `json:"url"`
}

// listPorts lists the ports servers in a running capsule listen on.
func (s *Server) listPorts(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	res, err := c.ListPorts(r.Context(), connect.NewRequest(&pb.ListPortsRequest{SandboxId: sb.ID}))
	if err != nil {
		return err
	}
	out := []portJSON{}
	for _, pt := range res.Msg.GetPorts() {
		out = append(out, portJSON{Port: pt.GetPort(), Addresses: pt.GetAddresses(), Forwarded: pt.GetForwarded(), PID: pt.GetPid(),
			Command: pt.GetCommand(), URL: ingress.URL(s.cfg.IngressScheme, s.cfg.IngressDomain, sb.ID, int(pt.GetPort()))})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) destroyCapsule(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, err := s.capsule(r, p)
	if err != nil {
		return err
	}
	if sb.Status == "stopped" || sb.Status == "error" {
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	err = s.destroyOnHost(r.Context(), sb)
	s.audit(r.Context(), p, p.TeamID, "capsule", sb.ID, "capsule.destroy", err, nil)
	if err != nil {
		return err
	}
	cur, err := s.st.Sandbox(r.Context(), p.TeamID, sb.ID)
	if err != nil {
		return err
	}
	if cur.Status == "stopped" {
		// Gone, as upstream Wrenn answers it. A capsule whose host could
		// not be reached stays stopping (202 with it): the reconciler ends
		// it when the host is back.
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	writeJSON(w, http.StatusAccepted, s.toCapsule(cur))
	return nil
}

// destroyOnHost marks a capsule stopping, destroys it on its host and
// marks it stopped. If the host cannot be reached the capsule stays
// stopping and the reconciler finishes the job when the host is back.
func (s *Server) destroyOnHost(ctx context.Context, sb store.Sandbox) error {
	if _, err := s.st.Transition(ctx, sb.ID, store.Live, "stopping", nil); err != nil {
		return err
	}
	s.capsuleChanged(sb.ID)
	if sb.HostID == nil {
		_, err := s.st.Transition(ctx, sb.ID, []string{"stopping"}, "stopped", map[string]any{"stopped_at": store.Now})
		return err
	}
	if err := s.DestroyStopping(ctx, sb.ID, *sb.HostID); err != nil {
		s.log.Warn("destroy deferred: host not reachable", "capsule", sb.ID, "host", *sb.HostID, "err", err)
	}
	return nil
}

// DestroyStopping finishes destroying a capsule marked stopping.
func (s *Server) DestroyStopping(ctx context.Context, id, hostID string) error {
	c, _, err := s.agentFor(ctx, hostID)
	if err == nil {
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		_, err = c.DestroySandbox(cctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id}))
		cancel()
		if connect.CodeOf(err) == connect.CodeNotFound {
			err = nil
		}
	}
	if errors.Is(err, store.ErrNotFound) {
		err = nil // the host was deleted with everything on it
	}
	if err != nil {
		return err
	}
	_, err = s.st.Transition(ctx, id, []string{"stopping"}, "stopped", map[string]any{"stopped_at": store.Now})
	s.log.Info("capsule destroyed", "capsule", id, "host", hostID)
	return err
}

// ping resets the inactivity timer; a body {"timeout_sec": N} also sets
// a new timeout (0: none; positive values below 60 become 60).
func (s *Server) ping(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		TimeoutSec *int `json:"timeout_sec"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	if req.TimeoutSec != nil && (*req.TimeoutSec < 0 || *req.TimeoutSec > maxTimeoutSec) {
		return badRequest("timeout_sec must be between 0 and %d", maxTimeoutSec)
	}
	sb, err := s.capsule(r, p)
	if err != nil {
		return err
	}
	if sb.Status != "running" {
		return errf(http.StatusConflict, "invalid_state", "capsule %s is %s, not running", sb.ID, sb.Status)
	}
	if req.TimeoutSec != nil {
		t := *req.TimeoutSec
		if t > 0 && t < 60 {
			t = 60
		}
		err := s.st.SetTimeout(r.Context(), sb.ID, t)
		s.audit(r.Context(), p, p.TeamID, "capsule", sb.ID, "capsule.set_timeout", err, map[string]any{"timeout_sec": t})
		if err != nil {
			return err
		}
	}
	if err := s.st.Touch(r.Context(), sb.ID); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) pause(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, err := s.capsule(r, p)
	if err != nil {
		return err
	}
	cur, err := s.Pause(r.Context(), sb)
	s.audit(r.Context(), p, p.TeamID, "capsule", sb.ID, "capsule.pause", err, nil)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, s.toCapsule(cur))
	return nil
}

// Pause snapshots a running capsule on its host. On failure the record
// follows what the host reports, so it never claims a state it is not in.
func (s *Server) Pause(ctx context.Context, sb store.Sandbox) (store.Sandbox, error) {
	if sb.Status != "running" || sb.HostID == nil {
		return sb, errf(http.StatusConflict, "invalid_state", "capsule %s is %s, not running", sb.ID, sb.Status)
	}
	c, _, err := s.agentFor(ctx, *sb.HostID)
	if err != nil {
		return sb, err
	}
	if _, err := s.st.Transition(ctx, sb.ID, []string{"running"}, "pausing", nil); err != nil {
		return sb, errf(http.StatusConflict, "invalid_state", "%s", err.Error())
	}
	return s.pausing(ctx, c, sb)
}

// PauseExpired pauses a capsule the reconciler found past its timeout if
// it still is as the pause begins: the move to pausing checks the
// deadline in the same statement, so a ping or a longer timeout that
// lands at that moment either comes first and saves it, or finds it
// pausing. It reports whether the pause began.
func (s *Server) PauseExpired(ctx context.Context, sb store.Sandbox) (bool, error) {
	if sb.HostID == nil {
		return false, nil
	}
	c, _, err := s.agentFor(ctx, *sb.HostID)
	if err != nil {
		return false, err
	}
	if began, err := s.st.PauseExpired(ctx, sb.ID); err != nil || !began {
		return false, err
	}
	_, err = s.pausing(ctx, c, sb)
	return true, err
}

// pausing pauses a capsule already marked pausing on its host.
func (s *Server) pausing(ctx context.Context, c agentclient.Client, sb store.Sandbox) (store.Sandbox, error) {
	s.capsuleChanged(sb.ID)
	defer s.capsuleChanged(sb.ID)
	_, perr := c.PauseSandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.ID}))
	if perr != nil {
		s.settle(context.WithoutCancel(ctx), c, sb.ID, "pausing", "running", perr)
		return sb, perr
	}
	return s.st.Transition(context.WithoutCancel(ctx), sb.ID, []string{"pausing"}, "paused", nil)
}

// settle sets a capsule left in a transitional state by a failed call to
// what its host says. A call that never reached the host (it could not be
// dialled) changed nothing there, so the capsule goes back to before.
func (s *Server) settle(ctx context.Context, c agentclient.Client, id, from, before string, callErr error) {
	if neverSent(callErr) {
		_, _ = s.st.Transition(ctx, id, []string{from}, before, nil)
		return
	}
	resp, err := c.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: id}))
	to := ""
	switch {
	case connect.CodeOf(err) == connect.CodeNotFound:
		to = "missing"
	case err != nil:
		return // the reconciler will look again
	default:
		to = agentclient.Status(resp.Msg.GetSandbox().GetState())
	}
	if to != "" && to != from { // still pausing or resuming there: the reconciler settles it later
		_, _ = s.st.Transition(ctx, id, []string{from}, to, nil)
	}
}

// neverSent reports whether a call failed before reaching the agent: its
// connection could not be made.
func neverSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

func (s *Server) resume(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, err := s.capsule(r, p)
	if err != nil {
		return err
	}
	cur, err := s.Resume(r.Context(), sb, p)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, s.toCapsule(cur))
	return nil
}

// Resume restores a paused capsule on its host, within its team's quota,
// on behalf of p (nil: the ingress, on traffic); the audit log records it.
func (s *Server) Resume(ctx context.Context, sb store.Sandbox, p *principal) (store.Sandbox, error) {
	if sb.Status != "paused" || sb.HostID == nil {
		return sb, errf(http.StatusConflict, "invalid_state", "capsule %s is %s, not paused", sb.ID, sb.Status)
	}
	c, _, err := s.agentFor(ctx, *sb.HostID)
	if err != nil {
		return sb, err
	}
	if err := s.st.ResumeWithin(ctx, sb, s.cfg.Quotas); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return sb, errf(http.StatusConflict, "invalid_state", "%s", err.Error())
		}
		return sb, err
	}
	if sb.EndAt != nil && time.Until(*sb.EndAt) < time.Minute {
		// Paused at its deadline: it gets E2B's default time again (the
		// E2B API's connect sets its own right after).
		if err := s.setDeadline(ctx, sb.ID, time.Now().Add(5*time.Minute), false); err != nil {
			return sb, err
		}
	}
	s.capsuleChanged(sb.ID)
	_, rerr := c.ResumeSandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.ID}))
	if rerr != nil {
		s.settle(context.WithoutCancel(ctx), c, sb.ID, "resuming", "paused", rerr)
		s.audit(ctx, p, sb.TeamID, "capsule", sb.ID, "capsule.resume", rerr, nil)
		return sb, rerr
	}
	cur, err := s.st.Transition(context.WithoutCancel(ctx), sb.ID, []string{"resuming"}, "running", map[string]any{"last_active_at": store.Now})
	s.capsuleChanged(sb.ID)
	s.audit(ctx, p, sb.TeamID, "capsule", sb.ID, "capsule.resume", err, nil)
	return cur, err
}

// withDefaults is a template's default variables with the request's over
// them.
func withDefaults(defaults, envs map[string]string) map[string]string {
	if len(defaults) == 0 {
		return envs
	}
	out := maps.Clone(defaults)
	maps.Copy(out, envs)
	return out
}
