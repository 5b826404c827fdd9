package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/version"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// The E2B-compatible API: the routes E2B's SDKs call (e2b-dev/infra's
// spec/openapi.yml), at the root of the control plane's URL, so that
// E2B_API_URL can point here. Capsules made here are capsules like any
// other (the /v1 API, the CLI and the dashboard see them), with E2B's
// rules: an absolute deadline, public ports unless asked otherwise.

// e2bRoute is one endpoint of the E2B API; every one takes the team's
// API key (X-API-Key) or a member's JWT.
type e2bRoute struct {
	method, path string
	handler      func(*Server, http.ResponseWriter, *http.Request, *principal) error
}

var e2bRoutes = []e2bRoute{
	{"POST", "/sandboxes", (*Server).e2bCreateV1},
	{"POST", "/v2/sandboxes", (*Server).e2bCreateV2},
	{"GET", "/sandboxes", (*Server).e2bListV1},
	{"GET", "/v2/sandboxes", (*Server).e2bListV2},
	{"GET", "/sandboxes/{sandboxID}", (*Server).e2bGet},
	{"DELETE", "/sandboxes/{sandboxID}", (*Server).e2bKill},
	{"POST", "/sandboxes/{sandboxID}/pause", (*Server).e2bPause},
	{"POST", "/sandboxes/{sandboxID}/resume", (*Server).e2bResume},
	{"POST", "/sandboxes/{sandboxID}/connect", (*Server).e2bConnectV1},
	{"POST", "/v2/sandboxes/{sandboxID}/connect", (*Server).e2bConnectV2},
	{"POST", "/sandboxes/{sandboxID}/timeout", (*Server).e2bSetTimeout},
	{"POST", "/sandboxes/{sandboxID}/refreshes", (*Server).e2bRefresh},
	{"GET", "/sandboxes/{sandboxID}/metrics", (*Server).e2bMetrics},
	{"POST", "/sandboxes/{sandboxID}/snapshots", (*Server).e2bCreateSnapshot},
	{"POST", "/sandboxes/{sandboxID}/fork", (*Server).e2bFork},
	{"GET", "/snapshots", (*Server).e2bListSnapshots},
	{"DELETE", "/templates/{templateID}", (*Server).e2bDeleteTemplate},
	{"GET", "/templates", (*Server).e2bTemplates},
	{"GET", "/templates/{templateID}", (*Server).e2bGetTemplate},
	{"GET", "/templates/aliases/{alias}", (*Server).e2bAlias},
}

// E2BRoutes lists the E2B-compatible endpoints as "METHOD /path".
func E2BRoutes() []string {
	out := make([]string, 0, len(e2bRoutes))
	for _, rt := range e2bRoutes {
		out = append(out, rt.method+" "+rt.path)
	}
	return out
}

// e2bClientID stands in E2B's deprecated, still required clientID.
const e2bClientID = "wrenn"

// e2bError answers in E2B's shape, {"code": <status>, "message": "..."}:
// the SDKs read the code from the body (a 404 there is "not found").
func (s *Server) e2bError(w http.ResponseWriter, r *http.Request, err error) {
	ae := s.asAPIError(r.Context(), err)
	if ae.status >= 500 {
		s.log.Error("E2B API request failed", "method", r.Method, "path", r.URL.Path, "status", ae.status, "err", err)
	}
	status := ae.status
	if status < 400 || status > 599 {
		status = http.StatusInternalServerError
	}
	writeJSON(w, status, map[string]any{"code": status, "message": ae.message, "error_code": ae.code})
}

// e2bWrap authenticates and rate-limits an E2B route.
func (s *Server) e2bWrap(rt e2bRoute) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.setDeadlines(w, r, route{path: rt.path})
		if !cleanPath(r.URL.Path) {
			s.e2bError(w, r, badRequest("the path holds control characters or invalid UTF-8"))
			return
		}
		p, err := s.authenticate(r, team)
		if err != nil {
			if ae := s.asAPIError(r.Context(), err); ae.status == http.StatusUnauthorized {
				err = errf(http.StatusUnauthorized, "unauthorized", "invalid API key: send a Wrenn API key (wrn_... or e2b_...) in X-API-Key")
			}
			s.e2bError(w, r, err)
			return
		}
		if wait, ok := s.limit.allow(p.limitKey); !ok {
			w.Header().Set("Retry-After", wait)
			s.e2bError(w, r, errf(http.StatusTooManyRequests, "rate_limited", "too many requests; retry after %s s", wait))
			return
		}
		if err := rt.handler(s, w, r, p); err != nil {
			s.e2bError(w, r, err)
		}
	})
}

// --- shapes -----------------------------------------------------------

type e2bNetwork struct {
	AllowOut           []string        `json:"allowOut,omitempty"`
	DenyOut            []string        `json:"denyOut,omitempty"`
	AllowPublicTraffic *bool           `json:"allowPublicTraffic,omitempty"`
	MaskRequestHost    string          `json:"maskRequestHost,omitempty"`
	Rules              json.RawMessage `json:"rules,omitempty"`
	EgressProxy        json.RawMessage `json:"egressProxy,omitempty"`
	HTTPSPorts         []int           `json:"httpsPorts,omitempty"`
}

type e2bNewSandbox struct {
	TemplateID      string `json:"templateID"`
	Timeout         *int   `json:"timeout"`
	AutoPause       *bool  `json:"autoPause"`
	AutoPauseMemory *bool  `json:"autoPauseMemory"`
	AutoResume      *struct {
		Enabled bool `json:"enabled"`
	} `json:"autoResume"`
	Secure              *bool             `json:"secure"` // every sandbox's envd wants its token
	AllowInternetAccess *bool             `json:"allow_internet_access"`
	Network             *e2bNetwork       `json:"network"`
	Metadata            map[string]string `json:"metadata"`
	EnvVars             map[string]string `json:"envVars"`
	MCP                 json.RawMessage   `json:"mcp"`
	IAM                 json.RawMessage   `json:"iam"`
	VolumeMounts        []json.RawMessage `json:"volumeMounts"`
}

// e2bSandbox is E2B's Sandbox: what create, connect and resume answer.
type e2bSandbox struct {
	TemplateID         string  `json:"templateID"`
	SandboxID          string  `json:"sandboxID"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	Alias              string  `json:"alias,omitempty"`
	EnvdAccessToken    string  `json:"envdAccessToken,omitempty"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

type e2bLifecycle struct {
	AutoResume bool   `json:"autoResume"`
	OnTimeout  string `json:"onTimeout"`
}

// e2bListed is E2B's ListedSandbox; e2bDetail (SandboxDetail) adds the
// rest for GET /sandboxes/{id}.
type e2bListed struct {
	TemplateID  string            `json:"templateID"`
	Alias       string            `json:"alias,omitempty"`
	SandboxID   string            `json:"sandboxID"`
	ClientID    string            `json:"clientID"`
	StartedAt   time.Time         `json:"startedAt"`
	EndAt       time.Time         `json:"endAt"`
	CPUCount    int32             `json:"cpuCount"`
	MemoryMB    int32             `json:"memoryMB"`
	DiskSizeMB  int32             `json:"diskSizeMB"`
	Metadata    map[string]string `json:"metadata"`
	State       string            `json:"state"`
	EnvdVersion string            `json:"envdVersion"`
}

type e2bDetail struct {
	e2bListed
	EnvdAccessToken     string       `json:"envdAccessToken,omitempty"`
	AllowInternetAccess *bool        `json:"allowInternetAccess"`
	Domain              *string      `json:"domain"`
	Network             e2bNetwork   `json:"network"`
	Lifecycle           e2bLifecycle `json:"lifecycle"`
}

// e2bState is a capsule's state in E2B's words ("" when E2B has none:
// the sandbox is gone as far as E2B's clients are concerned).
func e2bState(status string) string {
	switch status {
	case "running", "starting", "pending", "resuming":
		return "running"
	case "paused", "pausing":
		return "paused"
	}
	return ""
}

// noDeadline is the endAt of capsules without an absolute deadline (made
// through /v1 without a timeout): E2B's schema requires one.
var noDeadline = time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC)

func (s *Server) e2bListedOf(sb store.Sandbox) e2bListed {
	started := sb.CreatedAt
	if sb.StartedAt != nil {
		started = *sb.StartedAt
	}
	end := noDeadline
	switch {
	case sb.EndAt != nil:
		end = *sb.EndAt
	case sb.TimeoutSec > 0:
		last := started
		if sb.LastActiveAt != nil {
			last = *sb.LastActiveAt
		}
		end = last.Add(time.Duration(sb.TimeoutSec) * time.Second)
	}
	disk := int32(0)
	if sb.DiskSizeMB != nil {
		disk = *sb.DiskSizeMB
	}
	md := sb.Metadata
	if md == nil {
		md = map[string]string{}
	}
	return e2bListed{TemplateID: sb.Template, Alias: sb.Template, SandboxID: sb.ID, ClientID: e2bClientID,
		StartedAt: started.UTC(), EndAt: end.UTC(), CPUCount: sb.VCPUs, MemoryMB: sb.MemoryMB, DiskSizeMB: disk,
		Metadata: md, State: e2bState(sb.Status), EnvdVersion: version.EnvdE2BLevel}
}

func (s *Server) e2bSandboxOf(ctx context.Context, sb store.Sandbox) (e2bSandbox, error) {
	t, err := s.st.SandboxTokens(ctx, sb.ID)
	if err != nil {
		return e2bSandbox{}, err
	}
	domain := s.cfg.IngressDomain
	out := e2bSandbox{TemplateID: sb.Template, Alias: sb.Template, SandboxID: sb.ID, ClientID: e2bClientID,
		EnvdVersion: version.EnvdE2BLevel, EnvdAccessToken: t.Envd, Domain: &domain}
	if !sb.Public {
		out.TrafficAccessToken = &t.Traffic
	}
	return out, nil
}

// --- create -----------------------------------------------------------

func (s *Server) e2bCreateV1(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.e2bCreate(w, r, p, 15) // NewSandbox's default timeout
}

func (s *Server) e2bCreateV2(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.e2bCreate(w, r, p, 300) // NewSandboxV2's
}

func (s *Server) e2bCreate(w http.ResponseWriter, r *http.Request, p *principal, defaultTimeout int) error {
	var in e2bNewSandbox
	if err := decode(w, r, &in, false); err != nil {
		return err
	}
	req, err := s.e2bRequest(r.Context(), p, in, defaultTimeout)
	if err != nil {
		return err
	}
	sb, err := s.createAndWait(r.Context(), p, req)
	if err != nil {
		return err
	}
	out, err := s.e2bSandboxOf(r.Context(), sb)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}

// e2bRequest turns E2B's NewSandbox into a capsule request.
func (s *Server) e2bRequest(ctx context.Context, p *principal, in e2bNewSandbox, defaultTimeout int) (createCapsuleRequest, error) {
	var req createCapsuleRequest
	switch {
	case len(in.MCP) > 0 && string(in.MCP) != "null":
		return req, badRequest("mcp servers are not supported by this control plane")
	case len(in.VolumeMounts) > 0:
		return req, badRequest("volume mounts are not supported by this control plane")
	case len(in.IAM) > 0 && string(in.IAM) != "null":
		return req, badRequest("iam tokens are not supported by this control plane")
	case in.AutoPauseMemory != nil && !*in.AutoPauseMemory:
		return req, badRequest("autoPauseMemory: false (a filesystem-only pause) is not supported: a pause keeps the memory")
	}
	tpl, err := s.e2bResolveTemplate(ctx, p.TeamID, in.TemplateID)
	if err != nil {
		return req, err
	}
	timeout := defaultTimeout
	if in.Timeout != nil {
		timeout = *in.Timeout
	}
	if timeout < 0 || timeout > maxTimeoutSec {
		return req, badRequest("timeout must be between 0 and %d seconds", maxTimeoutSec)
	}
	end := time.Now().Add(time.Duration(timeout) * time.Second).UTC()
	vcpus, memory := s.cfg.E2BVCPUs, s.cfg.E2BMemoryMB
	if tpl.VCPUs != nil && *tpl.VCPUs > 0 {
		vcpus = int(*tpl.VCPUs)
	}
	if tpl.MemoryMB != nil && *tpl.MemoryMB > 0 {
		memory = int(*tpl.MemoryMB)
	}
	zero, autoPause := 0, in.AutoPause != nil && *in.AutoPause
	req = createCapsuleRequest{Template: tpl.Name, VCPUs: &vcpus, MemoryMB: &memory, TimeoutSec: &zero, AutoPause: &autoPause,
		Envs: in.EnvVars, Metadata: in.Metadata, Public: true, AutoResume: in.AutoResume != nil && in.AutoResume.Enabled, endAt: &end}
	if req.Egress, err = e2bEgress(in.AllowInternetAccess, in.Network); err != nil {
		return req, err
	}
	if n := in.Network; n != nil {
		switch {
		case n.MaskRequestHost != "":
			return req, badRequest("network.maskRequestHost is not supported: the app sees the name it was called by")
		case len(n.Rules) > 0 && string(n.Rules) != "null" && string(n.Rules) != "{}":
			return req, badRequest("network.rules are not supported by this control plane")
		case len(n.EgressProxy) > 0 && string(n.EgressProxy) != "null":
			return req, badRequest("network.egressProxy is not supported by this control plane")
		case len(n.HTTPSPorts) > 0:
			return req, badRequest("network.httpsPorts is not supported: the ingress serves TLS itself when configured")
		}
		if n.AllowPublicTraffic != nil {
			req.Public = *n.AllowPublicTraffic
		}
	}
	return req, req.validate()
}

// e2bEgress maps E2B's network options onto an egress policy: denyOut
// blocks, allowOut makes exceptions to a full deny; no internet access is
// a deny of everything but allowOut.
func e2bEgress(internet *bool, n *e2bNetwork) (store.Egress, error) {
	var allow, deny []string
	if n != nil {
		allow, deny = n.AllowOut, n.DenyOut
	}
	for _, c := range append(append([]string{}, allow...), deny...) {
		if _, err := netip.ParsePrefix(c); err != nil {
			if _, err := netip.ParseAddr(c); err != nil {
				return store.Egress{}, badRequest("network: %q is not an IPv4 CIDR or address (domain names are not supported)", c)
			}
		}
	}
	denyAll := internet != nil && !*internet
	for _, d := range deny {
		if d == "0.0.0.0/0" {
			denyAll = true
		}
	}
	switch {
	case denyAll && len(allow) > 0:
		return store.Egress{Mode: "allow_list", Allow: allow}, nil
	case denyAll:
		return store.Egress{Mode: "deny_all"}, nil
	case len(deny) > 0 && len(allow) > 0:
		return store.Egress{}, badRequest("network: allowOut as exceptions to a partial denyOut is not supported; deny 0.0.0.0/0 and list what to allow")
	case len(deny) > 0:
		return store.Egress{Mode: "allow_all", Deny: deny}, nil
	}
	return store.Egress{Mode: "allow_all"}, nil
}

// e2bResolveTemplate finds the template E2B names by name (or alias):
// "base" (the SDKs' default) is the base template, or minimal where no
// base template is installed.
func (s *Server) e2bResolveTemplate(ctx context.Context, teamID, name string) (store.Template, error) {
	if name == "" {
		name = "base"
	}
	name, _, _ = strings.Cut(name, ":") // a tag: templates here have one version
	tpl, err := s.st.TemplateByName(ctx, teamID, name)
	if errors.Is(err, store.ErrNotFound) && name == "base" {
		tpl, err = s.st.TemplateByName(ctx, teamID, "minimal")
	}
	if errors.Is(err, store.ErrNotFound) {
		return tpl, errf(http.StatusNotFound, "template_not_found", "template %q does not exist", name)
	}
	return tpl, err
}

// createAndWait places a capsule and returns it once it runs.
func (s *Server) createAndWait(ctx context.Context, p *principal, req createCapsuleRequest) (store.Sandbox, error) {
	sb, tpl, sreq, err := s.place(ctx, p, req)
	if err != nil {
		return sb, err
	}
	done := make(chan error, 1)
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		done <- s.runCreate(sb, tpl, req.Envs, sreq, p)
	}()
	var createErr error
	select {
	case createErr = <-done:
	case <-ctx.Done():
		return sb, ctx.Err()
	}
	cur, err := s.st.Sandbox(context.WithoutCancel(ctx), p.TeamID, sb.ID)
	if err != nil {
		return cur, err
	}
	if cur.Status != "running" {
		if connect.CodeOf(createErr) == connect.CodeResourceExhausted {
			return cur, errf(http.StatusServiceUnavailable, "host_full", "sandbox %s failed to start: no host had room: %s", cur.ID, cur.Error)
		}
		return cur, errf(http.StatusBadGateway, "create_failed", "sandbox %s failed to start: %s", cur.ID, cur.Error)
	}
	return cur, nil
}

// --- list and get -----------------------------------------------------

// e2bCapsule loads one of the team's capsules that E2B's clients can
// see (running or paused): others answer 404 in the body, as E2B does.
func (s *Server) e2bCapsule(r *http.Request, p *principal) (store.Sandbox, error) {
	r.SetPathValue("id", r.PathValue("sandboxID"))
	sb, err := s.capsule(r, p)
	if err == nil && e2bState(sb.Status) == "" {
		err = notFound("sandbox")
	}
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) && ae.status == http.StatusNotFound {
			return sb, errf(http.StatusNotFound, "not_found", "sandbox %q not found", r.PathValue("sandboxID"))
		}
	}
	return sb, err
}

func (s *Server) e2bGet(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	t, err := s.st.SandboxTokens(r.Context(), sb.ID)
	if err != nil {
		return err
	}
	domain := s.cfg.IngressDomain
	internet := sb.Egress.Mode != "deny_all"
	out := e2bDetail{e2bListed: s.e2bListedOf(sb), EnvdAccessToken: t.Envd, AllowInternetAccess: &internet, Domain: &domain,
		Lifecycle: e2bLifecycle{AutoResume: sb.AutoResume, OnTimeout: "kill"}}
	if sb.AutoPause {
		out.Lifecycle.OnTimeout = "pause"
	}
	public := sb.Public
	out.Network = e2bNetwork{AllowPublicTraffic: &public, AllowOut: sb.Egress.Allow, DenyOut: sb.Egress.Deny}
	if sb.Egress.Mode == "allow_list" || sb.Egress.Mode == "deny_all" {
		out.Network.DenyOut = []string{"0.0.0.0/0"}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// e2bListV1 lists running sandboxes (GET /sandboxes, deprecated by E2B).
func (s *Server) e2bListV1(w http.ResponseWriter, r *http.Request, p *principal) error {
	md, err := e2bMetadataQuery(r.URL.Query().Get("metadata"))
	if err != nil {
		return err
	}
	sbs, err := s.st.Sandboxes(r.Context(), store.SandboxFilter{TeamID: p.TeamID, Statuses: []string{"running", "starting", "resuming"}, Metadata: md, Limit: 1000})
	if err != nil {
		return err
	}
	out := make([]e2bListed, 0, len(sbs))
	for _, sb := range sbs {
		out = append(out, s.e2bListedOf(sb))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// e2bListV2 is GET /v2/sandboxes: state and metadata filters, pages of
// at most 100 with the next page's token in X-Next-Token.
func (s *Server) e2bListV2(w http.ResponseWriter, r *http.Request, p *principal) error {
	q := r.URL.Query()
	f := store.SandboxFilter{TeamID: p.TeamID}
	md, err := e2bMetadataQuery(q.Get("metadata"))
	if err != nil {
		return err
	}
	f.Metadata = md
	states := q.Get("state")
	if states == "" {
		states = "running,paused"
	}
	for _, st := range strings.Split(states, ",") {
		switch strings.TrimSpace(st) {
		case "running":
			f.Statuses = append(f.Statuses, "running", "starting", "pending", "resuming")
		case "paused":
			f.Statuses = append(f.Statuses, "paused", "pausing")
		default:
			return badRequest("state must be running or paused, not %q", st)
		}
	}
	if v := q.Get("startedAfter"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return badRequest("startedAfter must be an RFC 3339 time")
		}
		f.StartedAfter = &t
	}
	if v := q.Get("template"); v != "" {
		f.Template = v
	}
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		f.Ascending = true
	default:
		return badRequest("order must be asc or desc")
	}
	limit := 100
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			return badRequest("limit must be between 1 and 100")
		}
		limit = n
	}
	if tok := q.Get("nextToken"); tok != "" {
		c, err := parseCursor(tok)
		if err != nil {
			return badRequest("invalid next token")
		}
		f.After = &c
	}
	f.Limit = limit + 1
	sbs, err := s.st.Sandboxes(r.Context(), f)
	if err != nil {
		return err
	}
	if len(sbs) > limit {
		last := sbs[limit-1]
		w.Header().Set("X-Next-Token", makeCursor(store.Cursor{CreatedAt: last.CreatedAt, ID: last.ID}))
		sbs = sbs[:limit]
	}
	out := make([]e2bListed, 0, len(sbs))
	for _, sb := range sbs {
		out = append(out, s.e2bListedOf(sb))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// e2bMetadataQuery reads E2B's metadata filter: "k=v&k2=v2", each part
// URL-encoded (the SDKs encode the whole once more; the query parser
// undid that).
func e2bMetadataQuery(v string) (map[string]string, error) {
	if v == "" {
		return nil, nil
	}
	if un, err := url.QueryUnescape(v); err == nil {
		v = un
	}
	out := map[string]string{}
	for _, pair := range strings.Split(v, "&") {
		k, val, ok := strings.Cut(pair, "=")
		if !ok || k == "" || strings.Contains(val, "=") {
			return nil, badRequest("metadata must be key=value pairs joined by &")
		}
		uk, err1 := url.QueryUnescape(k)
		uv, err2 := url.QueryUnescape(val)
		if err1 != nil || err2 != nil {
			return nil, badRequest("metadata: bad escaping in %q", pair)
		}
		out[uk] = uv
	}
	return out, nil
}

func makeCursor(c store.Cursor) string {
	return base64.RawURLEncoding.EncodeToString([]byte(c.CreatedAt.UTC().Format(time.RFC3339Nano) + "__" + c.ID))
}

func parseCursor(tok string) (store.Cursor, error) {
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return store.Cursor{}, err
	}
	at, id, ok := strings.Cut(string(raw), "__")
	if !ok {
		return store.Cursor{}, errors.New("no separator")
	}
	t, err := time.Parse(time.RFC3339Nano, at)
	if err != nil {
		return store.Cursor{}, err
	}
	return store.Cursor{CreatedAt: t, ID: id}, nil
}

// --- lifecycle --------------------------------------------------------

func (s *Server) e2bKill(w http.ResponseWriter, r *http.Request, p *principal) error {
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	err = s.destroyOnHost(r.Context(), sb)
	s.audit(r.Context(), p, p.TeamID, "capsule", sb.ID, "capsule.destroy", err, map[string]any{"api": "e2b"})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) e2bPause(w http.ResponseWriter, r *http.Request, p *principal) error {
	var body struct {
		Memory *bool `json:"memory"`
	}
	if err := decode(w, r, &body, true); err != nil {
		return err
	}
	if body.Memory != nil && !*body.Memory {
		return badRequest("memory: false (a filesystem-only pause) is not supported: a pause keeps the memory")
	}
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	if e2bState(sb.Status) == "paused" {
		return errf(http.StatusConflict, "already_paused", "sandbox %s is already paused", sb.ID)
	}
	_, err = s.Pause(r.Context(), sb)
	s.audit(r.Context(), p, p.TeamID, "capsule", sb.ID, "capsule.pause", err, map[string]any{"api": "e2b"})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// e2bTimeoutBody is the body of connect, resume and timeout.
type e2bTimeoutBody struct {
	Timeout *int  `json:"timeout"`
	Memory  *bool `json:"memory"`
}

func (b e2bTimeoutBody) seconds(def int) (int, error) {
	t := def
	if b.Timeout != nil {
		t = *b.Timeout
	}
	if t < 0 || t > maxTimeoutSec {
		return 0, badRequest("timeout must be between 0 and %d seconds", maxTimeoutSec)
	}
	return t, nil
}

func (s *Server) e2bConnectV1(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.e2bConnect(w, r, p, true)
}

func (s *Server) e2bConnectV2(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.e2bConnect(w, r, p, false)
}

// e2bConnect answers a running sandbox (its deadline only ever moved
// later), resuming it first when paused (201).
func (s *Server) e2bConnect(w http.ResponseWriter, r *http.Request, p *principal, timeoutRequired bool) error {
	var body e2bTimeoutBody
	if err := decode(w, r, &body, !timeoutRequired); err != nil {
		return err
	}
	if timeoutRequired && body.Timeout == nil {
		return badRequest("timeout is required")
	}
	timeout, err := body.seconds(300)
	if err != nil {
		return err
	}
	ctx := r.Context()
	status := http.StatusOK
	deadline := time.Now().Add(s.cfg.CreateTimeout)
	for {
		sb, err := s.e2bCapsule(r, p)
		if err != nil {
			return err
		}
		switch sb.Status {
		case "running":
			if err := s.setDeadline(ctx, sb.ID, time.Now().Add(time.Duration(timeout)*time.Second), status == http.StatusOK); err != nil {
				return err
			}
			out, err := s.e2bSandboxOf(ctx, sb)
			if err != nil {
				return err
			}
			writeJSON(w, status, out)
			return nil
		case "paused":
			if body.Memory != nil && !*body.Memory {
				return badRequest("memory: false (a fresh boot from the disk) is not supported; resume keeps the memory")
			}
			if _, err := s.Resume(ctx, sb, p); err != nil {
				var ae *apiError
				if !errors.As(err, &ae) || ae.status != http.StatusConflict {
					return err
				}
			}
			status = http.StatusCreated
			if err := s.setDeadline(ctx, sb.ID, time.Now().Add(time.Duration(timeout)*time.Second), false); err != nil {
				return err
			}
			continue
		}
		if time.Now().After(deadline) {
			return conflict("sandbox %s is still %s", sb.ID, sb.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// e2bResume is the deprecated POST /sandboxes/{id}/resume: paused only.
func (s *Server) e2bResume(w http.ResponseWriter, r *http.Request, p *principal) error {
	var body e2bTimeoutBody
	if err := decode(w, r, &body, true); err != nil {
		return err
	}
	timeout, err := body.seconds(15)
	if err != nil {
		return err
	}
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	if e2bState(sb.Status) == "running" {
		return errf(http.StatusConflict, "already_running", "sandbox %s is already running", sb.ID)
	}
	cur, err := s.Resume(r.Context(), sb, p)
	if err != nil {
		return err
	}
	if err := s.setDeadline(r.Context(), cur.ID, time.Now().Add(time.Duration(timeout)*time.Second), false); err != nil {
		return err
	}
	out, err := s.e2bSandboxOf(r.Context(), cur)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}

// e2bSetTimeout sets the deadline to timeout seconds from now (earlier
// or later).
func (s *Server) e2bSetTimeout(w http.ResponseWriter, r *http.Request, p *principal) error {
	var body e2bTimeoutBody
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	if body.Timeout == nil {
		return badRequest("timeout is required")
	}
	timeout, err := body.seconds(0)
	if err != nil {
		return err
	}
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	err = s.setDeadline(r.Context(), sb.ID, time.Now().Add(time.Duration(timeout)*time.Second), false)
	s.audit(r.Context(), p, p.TeamID, "capsule", sb.ID, "capsule.set_timeout", err, map[string]any{"api": "e2b", "timeout_sec": timeout})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// e2bRefresh moves the deadline to duration seconds from now unless it
// is later already.
func (s *Server) e2bRefresh(w http.ResponseWriter, r *http.Request, p *principal) error {
	var body struct {
		Duration *int `json:"duration"`
	}
	if err := decode(w, r, &body, true); err != nil {
		return err
	}
	d := 60
	if body.Duration != nil {
		d = *body.Duration
	}
	if d < 0 || d > 3600 {
		return badRequest("duration must be between 0 and 3600 seconds")
	}
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	if err := s.setDeadline(r.Context(), sb.ID, time.Now().Add(time.Duration(d)*time.Second), true); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// e2bMetric is E2B's SandboxMetric.
type e2bMetric struct {
	Timestamp     time.Time `json:"timestamp"`
	TimestampUnix int64     `json:"timestampUnix"`
	CPUCount      int32     `json:"cpuCount"`
	CPUUsedPct    float64   `json:"cpuUsedPct"`
	MemUsed       int64     `json:"memUsed"`
	MemTotal      int64     `json:"memTotal"`
	MemCache      int64     `json:"memCache"`
	DiskUsed      int64     `json:"diskUsed"`
	DiskTotal     int64     `json:"diskTotal"`
}

// e2bMetrics answers the samples between start and end (unix seconds;
// default the last 10 minutes), or the current figures when none is kept.
func (s *Server) e2bMetrics(w http.ResponseWriter, r *http.Request, p *principal) error {
	q := r.URL.Query()
	end, start := time.Now(), time.Now().Add(-10*time.Minute)
	for name, t := range map[string]*time.Time{"start": &start, "end": &end} {
		if v := q.Get(name); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return badRequest("%s must be unix seconds", name)
			}
			*t = time.Unix(n, 0)
		}
	}
	sb, err := s.e2bCapsule(r, p)
	if err != nil {
		return err
	}
	samples, err := s.st.Metrics(r.Context(), sb.ID, start, 0)
	if err != nil {
		return err
	}
	memTotal := int64(sb.MemoryMB) << 20
	diskTotal := int64(0)
	if sb.DiskSizeMB != nil {
		diskTotal = int64(*sb.DiskSizeMB) << 20
	}
	out := []e2bMetric{}
	for _, m := range samples {
		if m.At.After(end) {
			continue
		}
		out = append(out, e2bMetric{Timestamp: m.At.UTC(), TimestampUnix: m.At.Unix(), CPUCount: sb.VCPUs, CPUUsedPct: m.CPUPct,
			MemUsed: m.MemBytes, MemTotal: memTotal, DiskUsed: m.DiskBytes, DiskTotal: diskTotal})
	}
	// No sample kept yet: a live one, when the range reaches now.
	if len(out) == 0 && sb.Status == "running" && sb.HostID != nil && !end.Before(time.Now().Add(-10*time.Second)) {
		if c, _, err := s.agentFor(r.Context(), *sb.HostID); err == nil {
			if m, err := c.GetSandboxMetrics(r.Context(), connect.NewRequest(&pb.GetSandboxMetricsRequest{Id: sb.ID})); err == nil {
				now := time.Now().UTC()
				out = append(out, e2bMetric{Timestamp: now, TimestampUnix: now.Unix(), CPUCount: m.Msg.GetCpuCount(), CPUUsedPct: m.Msg.GetCpuUsedPct(),
					MemUsed: m.Msg.GetMemUsedBytes(), MemTotal: m.Msg.GetMemTotalBytes(), DiskUsed: m.Msg.GetDiskUsedBytes(), DiskTotal: m.Msg.GetDiskTotalBytes()})
			}
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// --- templates --------------------------------------------------------

// e2bTemplateJSON is E2B's Template.
type e2bTemplateJSON struct {
	TemplateID    string     `json:"templateID"`
	BuildID       string     `json:"buildID"`
	CPUCount      int32      `json:"cpuCount"`
	MemoryMB      int32      `json:"memoryMB"`
	DiskSizeMB    int64      `json:"diskSizeMB"`
	Public        bool       `json:"public"`
	Aliases       []string   `json:"aliases"`
	Names         []string   `json:"names"`
	CreatedAt     time.Time  `json:"createdAt"`
	UpdatedAt     time.Time  `json:"updatedAt"`
	CreatedBy     *string    `json:"createdBy"`
	LastSpawnedAt *time.Time `json:"lastSpawnedAt"`
	SpawnCount    int64      `json:"spawnCount"`
	BuildCount    int32      `json:"buildCount"`
	EnvdVersion   string     `json:"envdVersion"`
	BuildStatus   string     `json:"buildStatus"`
	Builds        []any      `json:"builds,omitempty"`
}

func (s *Server) e2bTemplateOf(t store.Template) e2bTemplateJSON {
	vcpus, mem := int32(s.cfg.E2BVCPUs), int32(s.cfg.E2BMemoryMB)
	if t.VCPUs != nil {
		vcpus = *t.VCPUs
	}
	if t.MemoryMB != nil {
		mem = *t.MemoryMB
	}
	names := []string{t.Name}
	if t.Name == "minimal" {
		if _, err := s.st.TemplateByName(context.Background(), "", "base"); errors.Is(err, store.ErrNotFound) {
			names = append(names, "base") // what "base" stands for here
		}
	}
	return e2bTemplateJSON{TemplateID: t.Name, BuildID: t.ID, CPUCount: vcpus, MemoryMB: mem, DiskSizeMB: (t.SizeBytes + 1<<20 - 1) >> 20,
		Public: t.TeamID == nil, Aliases: names, Names: names, CreatedAt: t.CreatedAt.UTC(), UpdatedAt: t.CreatedAt.UTC(),
		EnvdVersion: version.EnvdE2BLevel, BuildStatus: "ready"}
}

func (s *Server) e2bTemplates(w http.ResponseWriter, r *http.Request, p *principal) error {
	ts, err := s.st.Templates(r.Context(), p.TeamID, "")
	if err != nil {
		return err
	}
	out := make([]e2bTemplateJSON, 0, len(ts))
	for _, t := range ts {
		out = append(out, s.e2bTemplateOf(t))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) e2bGetTemplate(w http.ResponseWriter, r *http.Request, p *principal) error {
	t, err := s.e2bResolveTemplate(r.Context(), p.TeamID, r.PathValue("templateID"))
	if err != nil {
		return err
	}
	out := s.e2bTemplateOf(t)
	out.Builds = []any{map[string]any{"buildID": t.ID, "status": "ready", "createdAt": t.CreatedAt.UTC(), "updatedAt": t.CreatedAt.UTC(),
		"cpuCount": out.CPUCount, "memoryMB": out.MemoryMB, "diskSizeMB": out.DiskSizeMB, "envdVersion": out.EnvdVersion}}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) e2bAlias(w http.ResponseWriter, r *http.Request, p *principal) error {
	t, err := s.e2bResolveTemplate(r.Context(), p.TeamID, r.PathValue("alias"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"templateID": t.Name, "public": t.TeamID == nil})
	return nil
}

// e2bMux adds the E2B routes to mux.
func (s *Server) e2bMux(mux *http.ServeMux) {
	for _, rt := range e2bRoutes {
		mux.Handle(rt.method+" "+rt.path, s.e2bWrap(rt))
	}
}
