// Package proxy carries the control plane's ingress traffic to ports
// inside sandboxes. It is served on the agent's RPC listener: a CONNECT
// request for "<sandbox id>:<port>" carrying the host token in
// TokenHeader becomes a TCP tunnel to that port of that sandbox, over
// which the control plane speaks HTTP (or anything else) to the server
// there. The agent only splices bytes: what the server sees is exactly
// what the control plane sends.
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
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/tcpjoin"
)

// TokenHeader carries "Bearer <host token>" on a CONNECT.
const TokenHeader = "Wrenn-Agent-Authorization"

// IsProxyRequest says whether r asks for a tunnel into a sandbox (RPCs
// are POSTs).
func IsProxyRequest(r *http.Request) bool { return r.Method == http.MethodConnect }

// Lookup finds a sandbox's state and address, without waiting behind
// an operation on it.
type Lookup interface {
	Peek(id string) (sandbox.Record, error)
}

// Handler is the proxy. Create it with New.
type Handler struct {
	sandboxes Lookup
	tokens    func() (current, previous string)
	log       *slog.Logger

	mu      sync.Mutex
	tunnels map[string]map[*tunnel]struct{} // by sandbox id
}

// tunnel is one open tunnel, closed when its sandbox stops running.
type tunnel struct {
	created time.Time // the sandbox's, to tell a new sandbox of the same id
	conns   [2]net.Conn
}

// New builds the proxy; tokens gives the host tokens that authenticate
// the control plane (the current one and the one before a rotation).
func New(sandboxes Lookup, tokens func() (string, string), log *slog.Logger) *Handler {
	return &Handler{sandboxes: sandboxes, tokens: tokens, log: log, tunnels: map[string]map[*tunnel]struct{}{}}
}

// Fail writes the JSON error the control plane passes on to clients, in
// the shape its ingress answers: Wrenn's {"error": {code, message}} and
// E2B's {code, message} at once.
func Fail(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"code": status, "message": msg, "error": map[string]string{"code": code, "message": msg}})
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

// dialTimeout bounds connecting to a server in a sandbox.
const dialTimeout = 5 * time.Second

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !h.Authorized(r) {
		h.log.Warn("unauthenticated proxy request", "remote", r.RemoteAddr)
		Fail(w, http.StatusUnauthorized, "unauthenticated", "missing or invalid host token in "+TokenHeader)
		return
	}
	if r.ProtoMajor != 1 {
		Fail(w, http.StatusHTTPVersionNotSupported, "bad_request", "tunnels are made over HTTP/1.1")
		return
	}
	idText, portText, err := net.SplitHostPort(r.Host)
	port, perr := strconv.Atoi(portText)
	if err != nil || perr != nil || port < 1 || port > 65535 || idText == "" {
		Fail(w, http.StatusBadRequest, "bad_request", "CONNECT wants <sandbox id>:<port>, port 1-65535")
		return
	}
	id := strings.ToLower(idText)
	rec, err := h.sandboxes.Peek(id)
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
	addr := net.JoinHostPort(rec.Net.SandboxIP.String(), strconv.Itoa(port))
	up, err := (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext(r.Context(), "tcp", addr)
	if err != nil {
		h.log.Debug("proxy: nothing answers", "sandbox", id, "port", port, "error", err)
		Fail(w, http.StatusBadGateway, "port_not_open", fmt.Sprintf("nothing answers on port %d in sandbox %s: start a server listening on it", port, id))
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = up.Close()
		Fail(w, http.StatusInternalServerError, "internal", "cannot take over the connection: "+err.Error())
		return
	}
	_ = conn.SetDeadline(time.Time{}) // the tunnel lasts as long as its traffic
	_, err = brw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n")
	if err == nil {
		err = brw.Flush()
	}
	// Bytes the client sent after its CONNECT, already read, go first.
	if n := brw.Reader.Buffered(); n > 0 && err == nil {
		buffered, _ := brw.Reader.Peek(n)
		_, err = up.Write(buffered)
	}
	if err != nil {
		_ = conn.Close()
		_ = up.Close()
		return
	}
	t := &tunnel{created: rec.CreatedAt, conns: [2]net.Conn{conn, up}}
	h.track(id, t)
	defer h.untrack(id, t)
	tcpjoin.Join(conn, up)
}

func (h *Handler) track(id string, t *tunnel) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.tunnels[id] == nil {
		h.tunnels[id] = map[*tunnel]struct{}{}
	}
	h.tunnels[id][t] = struct{}{}
}

func (h *Handler) untrack(id string, t *tunnel) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.tunnels[id], t)
	if len(h.tunnels[id]) == 0 {
		delete(h.tunnels, id)
	}
}

// Sweep closes the tunnels of sandboxes that no longer run (paused,
// destroyed, or replaced by a new sandbox of the same id): their peers
// are gone or frozen, and the control plane opens new ones.
func (h *Handler) Sweep() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, ts := range h.tunnels {
		rec, err := h.sandboxes.Peek(id)
		for t := range ts {
			if err != nil || rec.State != sandbox.Running || !rec.CreatedAt.Equal(t.created) {
				_ = t.conns[0].Close()
				_ = t.conns[1].Close()
			}
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
