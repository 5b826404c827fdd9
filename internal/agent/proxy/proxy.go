// Package proxy forwards HTTP and WebSocket traffic from the control
// plane's ingress to ports inside sandboxes. It is served on the agent's
// RPC listener and answers only requests that carry the host token in
// TokenHeader: the client's own Authorization header belongs to the
// server in the sandbox and passes through untouched.
package proxy

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/bufpool"
)

// The headers the control plane sets on a proxied request. None of them
// reaches the sandbox.
const (
	SandboxHeader = "Wrenn-Proxy-Sandbox"
	PortHeader    = "Wrenn-Proxy-Port"
	// TokenHeader carries "Bearer <host token>".
	TokenHeader = "Wrenn-Agent-Authorization"
)

// IsProxyRequest says whether r asks to be proxied into a sandbox.
func IsProxyRequest(r *http.Request) bool { return r.Header.Get(SandboxHeader) != "" }

// Lookup finds a sandbox's state and address.
type Lookup interface {
	Get(id string) (sandbox.Record, error)
}

// Handler is the proxy. Create it with New.
type Handler struct {
	sandboxes Lookup
	tokens    func() (current, previous string)
	log       *slog.Logger
	proxy     *httputil.ReverseProxy

	mu         sync.Mutex
	transports map[string]*sandboxTransport
}

// sandboxTransport keeps one sandbox's idle connections apart from any
// later sandbox given the same address.
type sandboxTransport struct {
	created time.Time
	t       *http.Transport
}

type targetKey struct{}

type target struct {
	id   string
	port int
	url  *url.URL
	t    *http.Transport
}

// New builds the proxy; tokens gives the host tokens that authenticate
// the control plane (the current one and the one before a rotation).
func New(sandboxes Lookup, tokens func() (string, string), log *slog.Logger) *Handler {
	h := &Handler{sandboxes: sandboxes, tokens: tokens, log: log, transports: map[string]*sandboxTransport{}}
	h.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			t := pr.In.Context().Value(targetKey{}).(*target)
			pr.SetURL(t.url)
			pr.Out.Host = pr.In.Host
			// The control plane is authenticated: its forwarding headers
			// name the real client and stand.
			for _, k := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
				if v := pr.In.Header.Values(k); len(v) > 0 {
					pr.Out.Header[k] = v
				}
			}
		},
		Transport:     transportFor{},
		FlushInterval: -1, // stream as the sandbox writes
		BufferPool:    bufpool.New(),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			t := r.Context().Value(targetKey{}).(*target)
			if errors.Is(err, context.Canceled) {
				return // the client went away
			}
			h.log.Debug("proxy upstream error", "sandbox", t.id, "port", t.port, "error", err)
			Fail(w, http.StatusBadGateway, "port_not_open", fmt.Sprintf("nothing answers on port %d in sandbox %s: start a server listening on it", t.port, t.id))
		},
	}
	return h
}

// transportFor sends each request through its sandbox's transport.
type transportFor struct{}

func (transportFor) RoundTrip(r *http.Request) (*http.Response, error) {
	return r.Context().Value(targetKey{}).(*target).t.RoundTrip(r)
}

// Fail writes the JSON error the control plane passes on to clients.
func Fail(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": code, "message": msg}})
}

// Authorized checks TokenHeader in constant time.
func (h *Handler) Authorized(r *http.Request) bool {
	got := []byte(r.Header.Get(TokenHeader))
	current, previous := h.tokens()
	for _, tok := range []string{current, previous} {
		if tok != "" && subtle.ConstantTimeCompare(got, []byte("Bearer "+tok)) == 1 {
			return true
		}
	}
	return false
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !h.Authorized(r) {
		h.log.Warn("unauthenticated proxy request", "remote", r.RemoteAddr)
		Fail(w, http.StatusUnauthorized, "unauthenticated", "missing or invalid host token in "+TokenHeader)
		return
	}
	id := strings.ToLower(r.Header.Get(SandboxHeader))
	port, err := strconv.Atoi(r.Header.Get(PortHeader))
	if err != nil || port < 1 || port > 65535 {
		Fail(w, http.StatusBadRequest, "bad_request", PortHeader+" must be a port number, 1-65535")
		return
	}
	for _, k := range []string{SandboxHeader, PortHeader, TokenHeader} {
		r.Header.Del(k)
	}
	rec, err := h.sandboxes.Get(id)
	if errors.Is(err, sandbox.ErrNotFound) {
		Fail(w, http.StatusNotFound, "not_found", "no sandbox "+id+" on this host")
		return
	}
	if err != nil {
		Fail(w, http.StatusInternalServerError, "internal", err.Error())
		return
	}
	if rec.State != sandbox.Running {
		Fail(w, http.StatusConflict, "sandbox_not_running", fmt.Sprintf("sandbox %s is %s; resume it first", id, rec.State))
		return
	}
	t := &target{id: id, port: port, t: h.transport(rec),
		url: &url.URL{Scheme: "http", Host: net.JoinHostPort(rec.Net.SandboxIP.String(), strconv.Itoa(port))}}
	// WebSocket and other upgrades are tunnelled by ReverseProxy.
	h.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), targetKey{}, t)))
}

// transport is the sandbox's own connection pool, made anew when a new
// sandbox of the same id appears.
func (h *Handler) transport(rec sandbox.Record) *http.Transport {
	h.mu.Lock()
	defer h.mu.Unlock()
	if st, ok := h.transports[rec.ID]; ok && st.created.Equal(rec.CreatedAt) {
		return st.t
	} else if ok {
		st.t.CloseIdleConnections()
	}
	t := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       60 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Bodies pass through as they come; headers from the guest are bounded.
		MaxResponseHeaderBytes: 1 << 20,
		DisableCompression:     true,
	}
	h.transports[rec.ID] = &sandboxTransport{created: rec.CreatedAt, t: t}
	return t
}

// Sweep drops the pools of sandboxes that are gone; the agent calls it
// from time to time.
func (h *Handler) Sweep() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, st := range h.transports {
		if rec, err := h.sandboxes.Get(id); err != nil || !rec.CreatedAt.Equal(st.created) || rec.State != sandbox.Running {
			st.t.CloseIdleConnections()
			delete(h.transports, id)
		}
	}
}

// RunSweeper sweeps every interval until ctx ends.
func (h *Handler) RunSweeper(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			h.Sweep()
		}
	}
}
