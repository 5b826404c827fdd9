// Package ingress holds the pure rules of the control plane's sandbox
// ingress: which requests are meant for a sandbox port, how a port's URL
// is written, and which credentials are the ingress's own (and so never
// forwarded into the sandbox).
package ingress

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
)

// The headers by which E2B's SDKs name a sandbox and port on one shared
// URL (E2B_SANDBOX_URL), and the header carrying a traffic token.
const (
	SandboxIDHeader    = "E2b-Sandbox-Id"
	SandboxPortHeader  = "E2b-Sandbox-Port"
	TrafficTokenHeader = "E2b-Traffic-Access-Token"
	// TrafficCookie keeps a traffic token in a browser, set from the
	// TrafficQuery parameter of a link.
	TrafficCookie = "wrenn_traffic_token"
	TrafficQuery  = "wrenn_traffic_token"
)

// EnvdPort is where envd listens in every sandbox; it enforces its own
// access token.
const EnvdPort = 49983

// Target is the sandbox port a request is for.
type Target struct {
	SandboxID string
	Port      int
	// ByHost: named by the Host header, not by E2b-Sandbox-* headers.
	ByHost bool
}

// hostLabel is "<port>-<sandbox id>", the first label of a sandbox port's
// host name. Only the control plane's own ids (sb-...) match, so names
// like "api-1.example.com" are never taken for a sandbox.
var hostLabel = regexp.MustCompile(`^([0-9]{1,5})-(sb-[a-z0-9]{1,64})$`)

// ErrBadTarget is wrapped by the errors of requests that name a sandbox
// port badly.
var ErrBadTarget = errors.New("bad sandbox address")

// TargetOf says which sandbox port r is for: by a Host of
// "<port>-<sandbox id>.<any domain>", else by the E2b-Sandbox-Id and
// E2b-Sandbox-Port headers. ok is false for requests meant for the
// control plane itself; err is set for ones that name a sandbox badly.
func TargetOf(r *http.Request) (t Target, ok bool, err error) {
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	label, _, _ := strings.Cut(strings.ToLower(host), ".")
	if m := hostLabel.FindStringSubmatch(label); m != nil {
		port, err := parsePort(m[1])
		return Target{SandboxID: m[2], Port: port, ByHost: true}, true, err
	}
	id := r.Header.Get(SandboxIDHeader)
	if id == "" {
		return Target{}, false, nil
	}
	id = strings.ToLower(id)
	if !hostLabel.MatchString("1-" + id) {
		return Target{}, true, fmt.Errorf("%w: %s %q is not a sandbox id", ErrBadTarget, SandboxIDHeader, id)
	}
	p := r.Header.Get(SandboxPortHeader)
	if p == "" {
		return Target{}, true, fmt.Errorf("%w: %s needs %s", ErrBadTarget, SandboxIDHeader, SandboxPortHeader)
	}
	port, err := parsePort(p)
	return Target{SandboxID: id, Port: port}, true, err
}

func parsePort(s string) (int, error) {
	port, err := strconv.Atoi(s)
	if err != nil || port < 1 || port > 65535 {
		return 0, fmt.Errorf("%w: %q is not a port (1-65535)", ErrBadTarget, s)
	}
	return port, nil
}

// Host is the host name of a sandbox port under domain ("example.com" or
// "localhost:8000").
func Host(domain, sandboxID string, port int) string {
	return fmt.Sprintf("%d-%s.%s", port, sandboxID, domain)
}

// URL is the address of a sandbox port: scheme "https" or "http".
func URL(scheme, domain, sandboxID string, port int) string {
	return scheme + "://" + Host(domain, sandboxID, port)
}

// StripCredentials removes the ingress's own credentials from a request
// about to be forwarded into a sandbox: the API key, the traffic token
// (header and cookie) and, when it was the control plane's JWT that
// authenticated (ownAuthorization), the Authorization header. Anything
// else, an application's own Authorization included, passes.
func StripCredentials(h http.Header, ownAuthorization bool) {
	h.Del("X-API-Key")
	h.Del(TrafficTokenHeader)
	h.Del(SandboxIDHeader)
	h.Del(SandboxPortHeader)
	if ownAuthorization {
		h.Del("Authorization")
	}
	cookies := h.Values("Cookie")
	if len(cookies) == 0 {
		return
	}
	var kept []string
	for _, line := range cookies {
		for _, part := range strings.Split(line, ";") {
			name, _, _ := strings.Cut(strings.TrimSpace(part), "=")
			if name != TrafficCookie && strings.TrimSpace(part) != "" {
				kept = append(kept, strings.TrimSpace(part))
			}
		}
	}
	h.Del("Cookie")
	if len(kept) > 0 {
		h.Set("Cookie", strings.Join(kept, "; "))
	}
}

// TrafficToken is the traffic token a request presents: the header, else
// the cookie.
func TrafficToken(r *http.Request) string {
	if t := r.Header.Get(TrafficTokenHeader); t != "" {
		return t
	}
	if c, err := r.Cookie(TrafficCookie); err == nil {
		return c.Value
	}
	return ""
}
