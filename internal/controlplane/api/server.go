// Package api is the control plane's public REST + WebSocket API under /v1.
package api

import (
	"context"
	_ "embed"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"runtime/debug"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/internal/controlplane/agentca"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/apidocs"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/hostaddr"
	"github.com/wrenn/wrenn/internal/controlplane/ingress"
	"github.com/wrenn/wrenn/internal/controlplane/mail"
	"github.com/wrenn/wrenn/internal/controlplane/notify"
	"github.com/wrenn/wrenn/internal/controlplane/oauthlogin"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/version"
)

//go:embed openapi.yaml
var openAPI []byte

// Config is what the API needs.
type Config struct {
	Store  *store.Store
	Signer *auth.Signer
	Agents *agentclient.Pool
	Log    *slog.Logger
	// RatePerSecond and Burst limit each API key or user (per replica).
	RatePerSecond float64
	Burst         int
	// PublicPerMinute and PublicBurst limit each client address on the
	// routes that need no credentials (login, signup, activation, password
	// reset, host registration and refresh), per replica; negative: off.
	PublicPerMinute float64
	PublicBurst     int
	// TrustedProxies are the reverse proxies whose X-Forwarded-For names
	// the client (WRENN_TRUSTED_PROXIES); otherwise the peer is the client.
	TrustedProxies []netip.Prefix
	// Limits bound connections on the API's listener (see HTTPServer).
	Limits Limits
	// Quotas are the platform's default limits per team (zero fields: no
	// limit); platform admins override them per team.
	Quotas store.Quota
	// SignupsPerHour limits new accounts per client address (default 10;
	// negative: off).
	SignupsPerHour float64
	// CreateTimeout bounds one capsule create on an agent.
	CreateTimeout time.Duration
	// NotifyClient sends channel test messages (default: public addresses only).
	NotifyClient *http.Client
	// Mailer sends activation and password-reset mail; nil means signups
	// are active at once and password reset by mail is unavailable.
	Mailer mail.Sender
	// PublicURL is where users reach the dashboard (links in mail).
	PublicURL string
	// Dashboard, when set, serves every GET outside /v1 (the web app).
	Dashboard http.Handler
	// AgentCA, when set, signs agents' TLS certificates at registration
	// and refresh (see package agentca).
	AgentCA *agentca.CA
	// HostAddresses says which addresses hosts may register and the
	// control plane dials (see package hostaddr).
	HostAddresses hostaddr.Policy
	// IngressDomain and IngressScheme make sandbox port URLs:
	// IngressScheme://<port>-<capsule id>.IngressDomain (default
	// "localhost:8000" and "http").
	IngressDomain string
	IngressScheme string
	// E2BVCPUs and E2BMemoryMB size sandboxes made through the E2B API
	// from templates that name no size (default 2 and 512, as E2B's base).
	E2BVCPUs    int
	E2BMemoryMB int
	// DefaultDiskMB is a capsule's disk when it asks for none (default
	// 5120; thin, so only what is written takes room), or its template's
	// size when larger; MaxDiskMB is the most one may ask for (default
	// 512 GiB).
	DefaultDiskMB int
	MaxDiskMB     int
	// OAuth are the sign-in providers (GitHub), by name; their callbacks
	// are PublicURL/auth/oauth/<name>/callback.
	OAuth map[string]oauthlogin.Provider
}

// mailsPerHour is how many password-reset mails one account may be sent.
const mailsPerHour = 5.0

// Server serves the API. Close waits for background work it started.
type Server struct {
	cfg    Config
	st     *store.Store
	signer *auth.Signer
	agents *agentclient.Pool
	log    *slog.Logger
	limit  *limiter
	public *limiter // per client address, on routes without credentials
	// signups limits new accounts per client address.
	signups *limiter
	// mails limits the mail one account is sent (password resets).
	mails *limiter
	// misses makes unknown emails wait as accounts do after failed logins.
	misses missTracker
	events eventWatch

	// routes caches capsules' ingress routes; ingressRP forwards ingress traffic.
	routes      routeCache
	ingressOnce sync.Once
	ingressRP   *httputil.ReverseProxy

	notifyClient *http.Client
	bgCtx        context.Context
	bgCancel     context.CancelFunc
	bg           sync.WaitGroup
}

// New builds a Server.
func New(cfg Config) *Server {
	if cfg.RatePerSecond == 0 {
		cfg.RatePerSecond, cfg.Burst = 50, 100
	}
	if cfg.CreateTimeout == 0 {
		cfg.CreateTimeout = 3 * time.Minute
	}
	if cfg.PublicPerMinute == 0 {
		cfg.PublicPerMinute = 30
	}
	if cfg.PublicBurst == 0 {
		cfg.PublicBurst = 20
	}
	if cfg.SignupsPerHour == 0 {
		cfg.SignupsPerHour = 10
	}
	cfg.Limits = cfg.Limits.withDefaults()
	if cfg.IngressDomain == "" {
		cfg.IngressDomain = "localhost:8000"
	}
	if cfg.IngressScheme == "" {
		cfg.IngressScheme = "http"
	}
	if cfg.E2BVCPUs == 0 {
		cfg.E2BVCPUs = 2
	}
	if cfg.E2BMemoryMB == 0 {
		cfg.E2BMemoryMB = 512
	}
	if cfg.DefaultDiskMB == 0 {
		cfg.DefaultDiskMB = 5120
	}
	if cfg.MaxDiskMB == 0 {
		cfg.MaxDiskMB = maxDiskMB
	}
	if cfg.NotifyClient == nil {
		cfg.NotifyClient = notify.NewClient(false)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{cfg: cfg, st: cfg.Store, signer: cfg.Signer, agents: cfg.Agents, log: cfg.Log,
		limit: newLimiter(cfg.RatePerSecond, cfg.Burst), public: newLimiter(cfg.PublicPerMinute/60, cfg.PublicBurst),
		signups:      newLimiter(cfg.SignupsPerHour/3600, max(1, int(cfg.SignupsPerHour))),
		mails:        newLimiter(mailsPerHour/3600, int(mailsPerHour)),
		notifyClient: cfg.NotifyClient, bgCtx: ctx, bgCancel: cancel}
}

// Close stops background work (creates in flight finish or are left for
// the reconciler) and waits for it.
func (s *Server) Close() {
	s.bgCancel()
	s.bg.Wait()
}

// access says who may call a route.
type access int

const (
	public access = iota // no credentials
	user                 // a user's JWT
	team                 // an API key or a user's JWT
	host                 // a host agent's JWT in X-Host-Token
)

// route is one documented endpoint; the OpenAPI test walks this table.
type route struct {
	method, path string
	access       access
	handler      func(*Server, http.ResponseWriter, *http.Request, *principal) error
}

// kind is the path whose deadlines and streaming the route has: a
// platform capsule route has its team twin's.
func (rt route) kind() string {
	if rest, ok := strings.CutPrefix(rt.path, "/v1/admin/capsules/{id}"); ok {
		return "/v1/capsules/{id}" + rest
	}
	return rt.path
}

// allRoutes are the routes and their platform twins.
func allRoutes() []route {
	return append(append([]route{}, routes...), platformTwins()...)
}

// Routes lists every endpoint as "METHOD /path" (for tests and docs).
func Routes() []string {
	var out []string
	for _, rt := range allRoutes() {
		out = append(out, rt.method+" "+rt.path)
	}
	return out
}

var routes = []route{
	{"POST", "/v1/auth/signup", public, (*Server).signup},
	{"POST", "/v1/auth/activate", public, (*Server).activate},
	{"POST", "/v1/auth/login", public, (*Server).login},
	{"POST", "/v1/auth/switch-team", user, (*Server).switchTeam},
	{"GET", "/v1/auth/providers", public, (*Server).listOAuthProviders},
	{"GET", "/auth/oauth/{provider}", public, (*Server).oauthStart},
	{"GET", "/auth/oauth/{provider}/callback", public, (*Server).oauthCallback},
	{"GET", "/v1/me/providers/{provider}/connect", user, (*Server).oauthConnect},
	{"DELETE", "/v1/me/providers/{provider}", user, (*Server).oauthDisconnect},
	{"DELETE", "/v1/me", user, (*Server).deleteMe},
	{"GET", "/v1/users/search", user, (*Server).searchUsers},
	{"GET", "/v1/me", user, (*Server).me},
	{"PATCH", "/v1/me", user, (*Server).updateMe},
	{"POST", "/v1/me/password", user, (*Server).changePassword},
	{"POST", "/v1/me/password/reset", public, (*Server).requestPasswordReset},
	{"POST", "/v1/me/password/reset/confirm", public, (*Server).confirmPasswordReset},

	{"GET", "/v1/api-keys", user, (*Server).listAPIKeys},
	{"POST", "/v1/api-keys", user, (*Server).createAPIKey},
	{"DELETE", "/v1/api-keys/{id}", user, (*Server).deleteAPIKey},

	{"GET", "/v1/teams", user, (*Server).listTeams},
	{"POST", "/v1/teams", user, (*Server).createTeam},
	{"GET", "/v1/teams/{id}", user, (*Server).getTeam},
	{"PATCH", "/v1/teams/{id}", user, (*Server).renameTeam},
	{"DELETE", "/v1/teams/{id}", user, (*Server).deleteTeam},
	{"GET", "/v1/teams/{id}/members", user, (*Server).listMembers},
	{"POST", "/v1/teams/{id}/members", user, (*Server).addMember},
	{"PATCH", "/v1/teams/{id}/members/{uid}", user, (*Server).updateMember},
	{"DELETE", "/v1/teams/{id}/members/{uid}", user, (*Server).removeMember},
	{"POST", "/v1/teams/{id}/leave", user, (*Server).leaveTeam},
	{"GET", "/v1/teams/{id}/limits", user, (*Server).teamLimits},

	{"POST", "/v1/capsules", team, (*Server).createCapsule},
	{"GET", "/v1/capsules", team, (*Server).listCapsules},
	{"GET", "/v1/capsules/stats", team, (*Server).capsuleStats},
	{"GET", "/v1/capsules/usage", team, (*Server).capsuleUsage},
	{"GET", "/v1/capsules/{id}", team, (*Server).getCapsule},
	{"GET", "/v1/capsules/{id}/metrics", team, (*Server).capsuleMetrics},
	{"GET", "/v1/capsules/{id}/ports", team, (*Server).listPorts},
	{"DELETE", "/v1/capsules/{id}", team, (*Server).destroyCapsule},
	{"POST", "/v1/capsules/{id}/exec", team, (*Server).exec},
	{"GET", "/v1/capsules/{id}/exec/stream", team, (*Server).execStream},
	{"GET", "/v1/capsules/{id}/processes", team, (*Server).listProcesses},
	{"DELETE", "/v1/capsules/{id}/processes/{selector}", team, (*Server).killProcess},
	{"GET", "/v1/capsules/{id}/processes/{selector}/stream", team, (*Server).processStream},
	{"GET", "/v1/capsules/{id}/pty", team, (*Server).pty},
	{"POST", "/v1/capsules/{id}/ping", team, (*Server).ping},
	{"POST", "/v1/capsules/{id}/pause", team, (*Server).pause},
	{"POST", "/v1/capsules/{id}/fork", team, (*Server).fork},
	{"POST", "/v1/capsules/{id}/resume", team, (*Server).resume},
	{"POST", "/v1/capsules/{id}/files/write", team, (*Server).writeFile},
	{"POST", "/v1/capsules/{id}/files/read", team, (*Server).readFile},
	{"POST", "/v1/capsules/{id}/files/list", team, (*Server).listDir},
	{"POST", "/v1/capsules/{id}/files/mkdir", team, (*Server).makeDir},
	{"POST", "/v1/capsules/{id}/files/remove", team, (*Server).removePath},
	{"POST", "/v1/capsules/{id}/files/stream/write", team, (*Server).streamWriteFile},
	{"POST", "/v1/capsules/{id}/files/stream/read", team, (*Server).streamReadFile},

	{"POST", "/v1/snapshots", team, (*Server).createSnapshot},
	{"GET", "/v1/snapshots", team, (*Server).listSnapshots},
	{"DELETE", "/v1/snapshots/{name}", team, (*Server).deleteSnapshot},
	{"PUT", "/v1/snapshots/{name}/warm-pool", team, (*Server).setSnapshotPool},

	{"POST", "/v1/builds", team, (*Server).createBuild},
	{"GET", "/v1/builds", team, (*Server).listBuilds},
	{"GET", "/v1/builds/{id}", team, (*Server).getBuild},
	{"POST", "/v1/builds/{id}/cancel", team, (*Server).cancelBuild},

	{"POST", "/v1/hosts", user, (*Server).createHost},
	{"GET", "/v1/hosts", user, (*Server).listHosts},
	{"POST", "/v1/hosts/register", public, (*Server).registerHost},
	{"POST", "/v1/hosts/auth/refresh", public, (*Server).refreshHost},
	{"GET", "/v1/hosts/{id}", user, (*Server).getHost},
	{"DELETE", "/v1/hosts/{id}", user, (*Server).deleteHost},
	{"POST", "/v1/hosts/{id}/token", user, (*Server).regenerateHostToken},
	{"POST", "/v1/hosts/{id}/heartbeat", host, (*Server).heartbeat},
	{"GET", "/v1/hosts/{id}/delete-preview", user, (*Server).hostDeletePreview},
	{"GET", "/v1/hosts/{id}/tags", user, (*Server).listHostTags},
	{"POST", "/v1/hosts/{id}/tags", user, (*Server).addHostTag},
	{"DELETE", "/v1/hosts/{id}/tags/{tag}", user, (*Server).removeHostTag},

	{"POST", "/v1/channels", user, (*Server).createChannel},
	{"GET", "/v1/channels", user, (*Server).listChannels},
	{"POST", "/v1/channels/test", user, (*Server).testChannel},
	{"GET", "/v1/channels/{id}", user, (*Server).getChannel},
	{"PATCH", "/v1/channels/{id}", user, (*Server).updateChannel},
	{"DELETE", "/v1/channels/{id}", user, (*Server).deleteChannel},
	{"PUT", "/v1/channels/{id}/config", user, (*Server).rotateChannelConfig},

	// The streams authenticate themselves: headers or a single-use ticket.
	{"GET", "/v1/events/stream", public, (*Server).streamEvents},
	{"POST", "/v1/events/token", team, (*Server).issueEventTicket},
	{"GET", "/v1/admin/events/stream", public, (*Server).adminStreamEvents},
	{"POST", "/v1/admin/events/token", user, (*Server).issueAdminEventTicket},

	{"GET", "/v1/audit-logs", user, (*Server).listAuditLogs},

	// Platform administration (the handlers check the admin flag).
	{"GET", "/v1/admin/users", user, (*Server).adminListUsers},
	{"PUT", "/v1/admin/users/{id}/admin", user, (*Server).adminSetUserAdmin},
	{"PUT", "/v1/admin/users/{id}/active", user, (*Server).adminSetUserActive},
	{"GET", "/v1/admin/teams", user, (*Server).adminListTeams},
	{"DELETE", "/v1/admin/teams/{id}", user, (*Server).adminDeleteTeam},
	{"PUT", "/v1/admin/teams/{id}/byoc", user, (*Server).adminSetTeamBYOC},
	{"PUT", "/v1/admin/teams/{id}/limits", user, (*Server).adminSetTeamLimits},
	{"GET", "/v1/admin/templates", user, (*Server).adminListTemplates},
	{"DELETE", "/v1/admin/templates/{name}", user, (*Server).adminDeleteTemplate},
	{"PUT", "/v1/admin/templates/{name}/warm-pool", user, (*Server).adminSetTemplatePool},
	{"GET", "/v1/admin/capsules", user, (*Server).adminListCapsules},
	{"GET", "/v1/admin/audit-logs", user, (*Server).adminListAuditLogs},
	{"POST", "/v1/admin/builds", user, (*Server).adminCreateBuild},
	{"GET", "/v1/admin/builds", user, (*Server).adminListBuilds},
	{"GET", "/v1/admin/builds/{id}", user, (*Server).adminGetBuild},
	{"POST", "/v1/admin/builds/{id}/cancel", user, (*Server).adminCancelBuild},
}

// Handler returns the HTTP handler with every route, JSON errors for
// unknown paths and methods, panic recovery and access logs.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	for _, rt := range allRoutes() {
		mux.Handle(rt.method+" "+rt.path, s.wrap(rt))
	}
	s.e2bMux(mux)
	mux.HandleFunc("GET /openapi.yaml", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/yaml")
		_, _ = w.Write(openAPI)
	})
	// The API's reference: Swagger UI over /openapi.yaml.
	docs := apidocs.Handler()
	mux.Handle("GET /docs", docs)
	mux.Handle("GET /docs/", docs)
	// Liveness, as upstream Wrenn answers it (/healthz also checks the database).
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok", "version": version.Version})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := s.st.Pool.Ping(r.Context()); err != nil {
			s.writeError(w, r, errf(http.StatusServiceUnavailable, "database_unavailable", "the database does not answer"))
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.Dashboard != nil && (r.Method == http.MethodGet || r.Method == http.MethodHead) && !strings.HasPrefix(r.URL.Path, "/v1/") {
			s.cfg.Dashboard.ServeHTTP(w, r)
			return
		}
		for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE"} {
			probe := r.Clone(r.Context())
			probe.Method = m
			if _, pattern := mux.Handler(probe); pattern != "/" && pattern != "" {
				s.writeError(w, r, errf(http.StatusMethodNotAllowed, "method_not_allowed", "%s is not allowed on %s", r.Method, r.URL.Path))
				return
			}
		}
		s.writeError(w, r, errf(http.StatusNotFound, "not_found", "no route %s %s", r.Method, r.URL.Path))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Requests for a sandbox port go to the sandbox, whatever the path.
		if t, ok, err := ingress.TargetOf(r); ok {
			s.serveIngress(w, r, t, err)
			return
		}
		start := time.Now()
		// Every request has deadlines; routes that stream lift them (wrap).
		bodyDeadline(w, r, s.cfg.Limits.Body)
		_ = http.NewResponseController(w).SetWriteDeadline(start.Add(s.cfg.Limits.Write))
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		defer func() {
			if p := recover(); p != nil {
				s.log.Error("panic in handler", "method", r.Method, "path", r.URL.Path, "panic", p, "stack", string(debug.Stack()))
				if !rec.wrote {
					s.writeError(rec, r, errf(http.StatusInternalServerError, "internal", "internal error"))
				}
			}
			s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "took", time.Since(start).Round(time.Microsecond))
		}()
		mux.ServeHTTP(rec, r)
	})
}

// wrap authenticates, rate-limits and runs a route's handler.
func (s *Server) wrap(rt route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.setDeadlines(w, r, rt)
		if !cleanPath(r.URL.Path) {
			s.writeError(w, r, badRequest("the path holds control characters or invalid UTF-8"))
			return
		}
		if rt.access == public && !streams[rt.kind()] {
			if wait, ok := s.public.allow("ip:" + s.clientKey(r)); !ok {
				w.Header().Set("Retry-After", wait)
				s.writeError(w, r, errf(http.StatusTooManyRequests, "rate_limited", "too many requests from this address; retry after %s s", wait))
				return
			}
		}
		var p *principal
		var err error
		var early *websocket.Conn
		if wantsFirstFrameAuth(rt, r) {
			r, p, early, err = s.firstFrameAuth(w, r)
		} else {
			p, err = s.authenticate(r, rt.access)
		}
		if err != nil {
			if !errors.Is(err, errSocketClosed) {
				s.writeError(w, r, err)
			}
			return
		}
		if early != nil {
			// The answer can only be WebSocket messages now.
			w = socketErrors{w}
		}
		if p != nil && p.limitKey != "" {
			if wait, ok := s.limit.allow(p.limitKey); !ok {
				limited := errf(http.StatusTooManyRequests, "rate_limited", "too many requests; retry after %s s", wait)
				if early != nil {
					s.failSocket(r.Context(), early, limited)
					return
				}
				w.Header().Set("Retry-After", wait)
				s.writeError(w, r, limited)
				return
			}
		}
		if streams[rt.kind()] && rt.access != public {
			var stop func()
			r, stop = s.whileValid(r, p)
			defer stop()
		}
		if err := rt.handler(s, w, r, p); err != nil {
			if early != nil {
				s.failSocket(r.Context(), early, err)
				return
			}
			s.writeError(w, r, err)
		}
	})
}

// socketErrors is the ResponseWriter of a request whose WebSocket is
// already open: its header and body writes go nowhere (errors are sent
// on the socket).
type socketErrors struct{ http.ResponseWriter }

func (socketErrors) WriteHeader(int)             {}
func (socketErrors) Write(b []byte) (int, error) { return len(b), nil }

// cleanPath refuses decoded paths with control characters (NUL, newlines)
// or invalid UTF-8, which no ID or name contains.
func cleanPath(p string) bool {
	if !utf8.ValidString(p) {
		return false
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (r *statusRecorder) WriteHeader(code int) {
	if !r.wrote {
		r.status, r.wrote = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	r.wrote = true
	return r.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController (flush, hijack for WebSockets) reach the real writer.
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
