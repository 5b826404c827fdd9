package api

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/bufpool"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/ingress"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Ingress timings.
const (
	routeTTL      = 2 * time.Second  // how long a capsule's route is reused
	touchEvery    = 15 * time.Second // traffic keeps a capsule active at most this often
	settleTimeout = 2 * time.Minute  // how long a request waits for a capsule to start or resume
)

// routeCache keeps capsules' routes for a moment, so a page's many
// requests cost one database read. Changes made through this replica
// forget the entry at once; others are seen within routeTTL (the host
// refuses traffic for a capsule it no longer runs in any case).
type routeCache struct {
	mu      sync.Mutex
	entries map[string]cachedRoute
	touched map[string]time.Time
}

type cachedRoute struct {
	route store.Route
	until time.Time
}

const maxCachedRoutes = 100000

func (c *routeCache) get(ctx context.Context, id string, load func(context.Context, string) (store.Route, error)) (store.Route, error) {
	now := time.Now()
	c.mu.Lock()
	e, ok := c.entries[id]
	c.mu.Unlock()
	if ok && now.Before(e.until) {
		return e.route, nil
	}
	r, err := load(ctx, id)
	if err != nil {
		return r, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil || len(c.entries) >= maxCachedRoutes {
		c.entries = map[string]cachedRoute{} // crude but bounded
	}
	c.entries[id] = cachedRoute{route: r, until: now.Add(routeTTL)}
	return r, nil
}

func (c *routeCache) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.entries, id)
}

// capsuleChanged drops what the ingress keeps of a capsule that paused,
// resumed or is being destroyed: its route, and idle tunnels into it.
func (s *Server) capsuleChanged(id string) {
	s.routes.forget(id)
	s.agents.ForgetTunnels(id)
}

// setDeadline sets a capsule's absolute deadline and forgets its cached
// route, so the ingress does not hold the old deadline against it.
func (s *Server) setDeadline(ctx context.Context, id string, at time.Time, extendOnly bool) error {
	err := s.st.SetDeadline(ctx, id, at, extendOnly)
	s.routes.forget(id)
	return err
}

// shouldTouch says whether traffic to id should mark it active now.
func (c *routeCache) shouldTouch(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.touched == nil || len(c.touched) >= maxCachedRoutes {
		c.touched = map[string]time.Time{}
	}
	if now.Sub(c.touched[id]) < touchEvery {
		return false
	}
	c.touched[id] = now
	return true
}

// ingressError answers in a shape both kinds of client read: Wrenn's
// {"error": {code, message}} and E2B's {code, message}.
func ingressError(w http.ResponseWriter, status int, code, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"code": status, "message": msg, "error": map[string]string{"code": code, "message": msg}})
}

// e2bStyle says a request is made as E2B's SDKs make them: to envd's
// port, or named by the E2b-Sandbox-* headers.
func e2bStyle(t ingress.Target) bool { return t.Port == ingress.EnvdPort || !t.ByHost }

// ingressGone answers for a capsule that cannot take traffic (unknown,
// destroyed, paused, timed out). E2B's edge answers every such case 502
// with {sandboxId, message, code}, and the SDKs read exactly that as "not
// running" (isRunning), so E2B-style requests get that; others get status.
func ingressGone(w http.ResponseWriter, t ingress.Target, status int, code, format string, args ...any) {
	if !e2bStyle(t) {
		ingressError(w, status, code, format, args...)
		return
	}
	// E2B's words at the top (its SDK tests compare them); ours, which say
	// why, in error.message.
	msg := fmt.Sprintf(format, args...)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusBadGateway)
	_ = json.NewEncoder(w).Encode(map[string]any{"sandboxId": t.SandboxID, "code": http.StatusBadGateway, "message": "The sandbox was not found",
		"error": map[string]string{"code": code, "message": msg}})
}

// serveIngress forwards a request for a sandbox port to the agent that
// runs the capsule, after checking who may reach it.
func (s *Server) serveIngress(w http.ResponseWriter, r *http.Request, t ingress.Target, terr error) {
	start := time.Now()
	// Proxied traffic streams for as long as it lasts, either way.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.Error("panic in ingress", "capsule", t.SandboxID, "panic", p)
		}
	}()
	if terr != nil {
		ingressError(w, http.StatusBadRequest, "bad_request", "%s", terr.Error())
		return
	}
	route, ok := s.ingressRoute(w, r, t)
	if !ok {
		return
	}
	ownAuth, ok := s.ingressAllowed(w, r, t, route)
	if !ok {
		return
	}
	if t.Port != ingress.EnvdPort && r.Method == http.MethodGet && r.URL.Query().Has(ingress.TrafficQuery) {
		s.keepTrafficToken(w, r)
		return
	}
	if route.TimeoutSec > 0 && s.routes.shouldTouch(route.ID) {
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			_ = s.st.Touch(s.bgCtx, route.ID) // traffic is activity: the capsule stays up while used
		}()
	}
	s.forward(w, r, t, route, ownAuth)
	s.log.Debug("ingress", "capsule", t.SandboxID, "port", t.Port, "method", r.Method, "path", r.URL.Path, "took", time.Since(start).Round(time.Microsecond))
}

// ingressRoute finds the capsule's route and waits, resumes or refuses
// as its state asks; ok is false when it has answered.
func (s *Server) ingressRoute(w http.ResponseWriter, r *http.Request, t ingress.Target) (store.Route, bool) {
	ctx := r.Context()
	deadline := time.Now().Add(settleTimeout)
	load := s.st.IngressRoute
	for {
		route, err := s.routes.get(ctx, t.SandboxID, load)
		if errors.Is(err, store.ErrNotFound) {
			ingressGone(w, t, http.StatusNotFound, "not_found", "no capsule %s: it does not exist or was destroyed", t.SandboxID)
			return route, false
		}
		if err != nil {
			s.log.Error("ingress: loading a capsule's route", "capsule", t.SandboxID, "err", err)
			ingressError(w, http.StatusServiceUnavailable, "unavailable", "the control plane cannot look up capsule %s now", t.SandboxID)
			return route, false
		}
		switch route.Status {
		case "running":
			if route.EndAt != nil && time.Now().After(*route.EndAt) && !route.AutoPause && e2bStyle(t) {
				// Its time is up: the reconciler destroys it within a second
				// or so. (One that pauses at its timeout serves until then.)
				ingressGone(w, t, http.StatusNotFound, "timed_out", "capsule %s reached its timeout", t.SandboxID)
				return route, false
			}
			if route.HostID == nil {
				ingressError(w, http.StatusServiceUnavailable, "not_placed", "capsule %s is on no host", t.SandboxID)
				return route, false
			}
			return route, true
		case "paused":
			if !route.AutoResume {
				ingressGone(w, t, http.StatusConflict, "capsule_paused",
					"capsule %s is paused: resume it (POST /v1/capsules/%s/resume), or create capsules with auto_resume to resume on traffic", t.SandboxID, t.SandboxID)
				return route, false
			}
			// Only a caller allowed to reach the capsule may wake it.
			if _, ok := s.ingressAllowed(noWriter{}, r, t, route); !ok {
				s.ingressAllowed(w, r, t, route)
				return route, false
			}
			sb, err := s.st.Sandbox(ctx, route.TeamID, route.ID)
			if err == nil {
				s.log.Info("resuming a capsule on traffic", "capsule", route.ID, "port", t.Port)
				_, err = s.Resume(ctx, sb, nil)
			}
			if ae := s.asAPIError(ctx, err); ae != nil && ae.status != http.StatusConflict {
				// A conflict is another request resuming it already: we wait.
				ingressError(w, http.StatusBadGateway, "resume_failed", "capsule %s could not be resumed: %s", t.SandboxID, ae.message)
				return route, false
			}
		case "starting", "resuming", "pending", "pausing":
			// Settles soon: wait for it.
		case "error":
			ingressError(w, http.StatusBadGateway, "capsule_failed", "capsule %s failed and cannot take traffic", t.SandboxID)
			return route, false
		default: // stopping, stopped, hibernated, missing
			ingressGone(w, t, http.StatusNotFound, "not_found", "capsule %s is %s", t.SandboxID, route.Status)
			return route, false
		}
		if time.Now().After(deadline) {
			ingressError(w, http.StatusServiceUnavailable, "not_ready", "capsule %s is still %s", t.SandboxID, route.Status)
			return route, false
		}
		s.routes.forget(t.SandboxID)
		select {
		case <-ctx.Done():
			return route, false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// asAPIError is err as the API would answer it (nil for nil).
func (s *Server) asAPIError(ctx context.Context, err error) *apiError {
	if err == nil {
		return nil
	}
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	return s.classify(ctx, err)
}

// noWriter discards an answer: for checks made twice.
type noWriter struct{}

func (noWriter) Header() http.Header         { return http.Header{} }
func (noWriter) Write(b []byte) (int, error) { return len(b), nil }
func (noWriter) WriteHeader(int)             {}

// ingressAllowed applies the capsule's rules: envd's port and public
// capsules are open (envd checks its own token); other ports want the
// team's API key or JWT, or the capsule's traffic token. ownAuth says
// the Authorization header was the control plane's and is not forwarded.
func (s *Server) ingressAllowed(w http.ResponseWriter, r *http.Request, t ingress.Target, route store.Route) (ownAuth, ok bool) {
	ctx := r.Context()
	var p *principal
	var err error
	if key := r.Header.Get("X-API-Key"); key != "" {
		p, err = s.keyPrincipal(ctx, key)
	} else if bearer, found := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); found && strings.Count(bearer, ".") == 2 {
		// A JWT of ours authenticates; any other bearer token is the
		// application's and passes through.
		if p, err = s.userPrincipal(ctx, bearer); err == nil {
			ownAuth = true
		} else {
			p, err = nil, nil
		}
	}
	if err != nil && t.Port != ingress.EnvdPort && !route.Public {
		ae := s.asAPIError(ctx, err)
		ingressError(w, ae.status, ae.code, "%s", ae.message)
		return false, false
	}
	if p != nil && p.TeamID != route.TeamID {
		// Another team's credentials reach nothing, not even a public port.
		ingressError(w, http.StatusNotFound, "not_found", "no capsule %s", t.SandboxID)
		return false, false
	}
	if t.Port == ingress.EnvdPort || route.Public || p != nil {
		return ownAuth, true
	}
	if tok := s.presentedTrafficToken(r); tok != "" && route.TrafficToken != "" &&
		subtle.ConstantTimeCompare([]byte(tok), []byte(route.TrafficToken)) == 1 {
		return false, true
	}
	ingressError(w, http.StatusUnauthorized, "unauthorized",
		"port %d of capsule %s needs the team's X-API-Key, a team member's token, or the capsule's traffic token (%s header)", t.Port, t.SandboxID, ingress.TrafficTokenHeader)
	return false, false
}

// presentedTrafficToken is the header or cookie, else the link's query
// parameter (which keepTrafficToken turns into a cookie).
func (s *Server) presentedTrafficToken(r *http.Request) string {
	if tok := ingress.TrafficToken(r); tok != "" {
		return tok
	}
	return r.URL.Query().Get(ingress.TrafficQuery)
}

// keepTrafficToken turns a link's traffic token into a cookie for this
// capsule port's host alone, and sends the browser on without it.
func (s *Server) keepTrafficToken(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	tok := q.Get(ingress.TrafficQuery)
	q.Del(ingress.TrafficQuery)
	http.SetCookie(w, &http.Cookie{Name: ingress.TrafficCookie, Value: tok, Path: "/", HttpOnly: true,
		Secure: r.TLS != nil, SameSite: http.SameSiteLaxMode})
	next := url.URL{Path: r.URL.Path, RawQuery: q.Encode()}
	if next.Path == "" {
		next.Path = "/"
	}
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, next.String(), http.StatusFound)
}

type ingressKey struct{}

type ingressHop struct {
	target  *url.URL
	route   store.Route
	rt      http.RoundTripper
	forward http.Header // X-Forwarded-* to send
	ownAuth bool        // the Authorization header was ours: not forwarded
}

// forward sends the request through the capsule's host agent.
func (s *Server) forward(w http.ResponseWriter, r *http.Request, t ingress.Target, route store.Route, ownAuth bool) {
	ctx := r.Context()
	if route.HostAddress == "" || route.HostToken == "" {
		ingressError(w, http.StatusServiceUnavailable, "host_unavailable", "the host of capsule %s is not registered", t.SandboxID)
		return
	}
	if err := s.cfg.HostAddresses.Check(route.HostType, route.HostAddress); err != nil {
		ingressError(w, http.StatusServiceUnavailable, "host_unavailable", "the host of capsule %s is at an address the control plane does not call", t.SandboxID)
		return
	}
	rt := s.agents.Tunnel(*route.HostID, route.HostAddress, route.HostToken, route.ID, t.Port)
	// The tunnel's transport ignores the address: each connection is a
	// tunnel to this sandbox port through its agent.
	target := &url.URL{Scheme: "http", Host: net.JoinHostPort(route.ID, strconv.Itoa(t.Port))}
	hop := &ingressHop{target: target, route: route, rt: rt, forward: s.forwardedFor(r), ownAuth: ownAuth}
	s.ingressProxy().ServeHTTP(w, r.WithContext(context.WithValue(ctx, ingressKey{}, hop)))
}

// forwardedFor writes the X-Forwarded-* headers: the client as this
// replica sees it, after the chain of trusted proxies in front of it.
func (s *Server) forwardedFor(r *http.Request) http.Header {
	h := http.Header{}
	peer, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		peer = r.RemoteAddr
	}
	proto := "http"
	if r.TLS != nil {
		proto = "https"
	}
	chain := peer
	if a, err := netip.ParseAddr(peer); err == nil && s.trusted(a) {
		if prior := r.Header.Values("X-Forwarded-For"); len(prior) > 0 {
			chain = strings.Join(prior, ", ") + ", " + peer
		}
		if p := r.Header.Get("X-Forwarded-Proto"); p == "https" || p == "http" {
			proto = p
		}
	}
	h.Set("X-Forwarded-For", chain)
	h.Set("X-Forwarded-Proto", proto)
	h.Set("X-Forwarded-Host", r.Host)
	return h
}

func (s *Server) trusted(a netip.Addr) bool {
	for _, p := range s.cfg.TrustedProxies {
		if p.Contains(a.Unmap()) {
			return true
		}
	}
	return false
}

// ingressProxy is the one reverse proxy every ingress request goes
// through; the hop in the request's context says where.
func (s *Server) ingressProxy() *httputil.ReverseProxy {
	s.ingressOnce.Do(func() {
		s.ingressRP = &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				hop := pr.In.Context().Value(ingressKey{}).(*ingressHop)
				pr.SetURL(hop.target)
				pr.Out.Host = pr.In.Host // the application sees the name it was called by
				ingress.StripCredentials(pr.Out.Header, hop.ownAuth)
				for k, v := range hop.forward {
					pr.Out.Header[k] = v
				}
			},
			Transport:     hopTransport{},
			FlushInterval: 0, // bodies of unknown length (streams, SSE) are flushed as they come; others are buffered
			BufferPool:    bufpool.New(),
			ErrorLog:      nil,
			ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
				hop := r.Context().Value(ingressKey{}).(*ingressHop)
				if errors.Is(err, context.Canceled) {
					return // the client went away
				}
				var refused *agentclient.TunnelRefused
				if errors.As(err, &refused) {
					// The agent's own answer: no such sandbox there, not running, nothing on the port.
					if refused.Status == http.StatusNotFound || refused.Status == http.StatusConflict {
						s.routes.forget(hop.route.ID) // our view was stale
					}
					w.Header().Set("Content-Type", "application/json")
					w.Header().Set("Cache-Control", "no-store")
					w.WriteHeader(refused.Status)
					_, _ = w.Write(refused.Body)
					return
				}
				s.log.Warn("ingress: the host agent cannot be reached", "capsule", hop.route.ID, "host", *hop.route.HostID, "err", err)
				ingressError(w, http.StatusBadGateway, "host_unreachable", "the host running capsule %s cannot be reached", hop.route.ID)
			},
		}
	})
	return s.ingressRP
}

type hopTransport struct{}

func (hopTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return r.Context().Value(ingressKey{}).(*ingressHop).rt.RoundTrip(r)
}
