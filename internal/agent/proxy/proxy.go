// Package proxy forwards HTTP and WebSocket traffic to ports inside
// sandboxes. A request for host "<port>-<sandbox id>.<any domain>" goes to
// that port of that sandbox, so a web server started in a sandbox can be
// opened in a browser.
package proxy

import (
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
	"time"

	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
)

// Lookup finds a running sandbox's address.
type Lookup interface {
	Get(id string) (sandbox.Record, error)
}

// Handler is the proxy.
type Handler struct {
	Sandboxes Lookup
	Log       *slog.Logger
}

// ParseHost splits "<port>-<sandbox id>.<domain>[:port]" into port and id.
func ParseHost(host string) (int, string, error) {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	label, _, _ := strings.Cut(host, ".")
	portText, id, ok := strings.Cut(label, "-")
	if !ok || id == "" {
		return 0, "", fmt.Errorf("host %q is not <port>-<sandbox id>.<domain>", host)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 1 || port > 65535 {
		return 0, "", fmt.Errorf("host %q: %q is not a port", host, portText)
	}
	return port, strings.ToLower(id), nil
}

func (h *Handler) fail(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": strings.ToLower(strings.ReplaceAll(http.StatusText(status), " ", "_")), "message": msg}})
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	port, id, err := ParseHost(r.Host)
	if err != nil {
		h.fail(w, http.StatusBadRequest, err.Error())
		return
	}
	if port == envdclient.Port {
		h.fail(w, http.StatusForbidden, "envd's port is not reachable through the proxy")
		return
	}
	rec, err := h.Sandboxes.Get(id)
	if errors.Is(err, sandbox.ErrNotFound) {
		h.fail(w, http.StatusNotFound, "no sandbox "+id+" on this host")
		return
	}
	if err != nil {
		h.fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	if rec.State != sandbox.Running {
		h.fail(w, http.StatusConflict, fmt.Sprintf("sandbox %s is %s; resume it first", id, rec.State))
		return
	}
	target := &url.URL{Scheme: "http", Host: net.JoinHostPort(rec.Net.SandboxIP.String(), strconv.Itoa(port))}
	rp := &httputil.ReverseProxy{
		// Rewrite (not Director) drops hop-by-hop and forwarding headers a
		// client could forge; SetXForwarded adds honest ones.
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Host = r.Host
		},
		Transport: &http.Transport{
			DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			ResponseHeaderTimeout: 60 * time.Second,
			// Bodies pass through as they come; headers from the guest are bounded.
			MaxResponseHeaderBytes: 1 << 20,
			DisableCompression:     true,
		},
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			h.Log.Debug("proxy upstream error", "sandbox", id, "port", port, "error", err)
			h.fail(w, http.StatusBadGateway, fmt.Sprintf("nothing answers on port %d in sandbox %s", port, id))
		},
	}
	rp.ServeHTTP(w, r) // WebSocket upgrades are tunnelled by ReverseProxy
}
