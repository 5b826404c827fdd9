package api

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/ingress"
)

// Limits bound what one client may hold open on the API's listener. The
// zero value keeps the defaults.
type Limits struct {
	// ReadHeader is how long a request's headers may take (default 10 s).
	ReadHeader time.Duration
	// Idle is how long a kept-alive connection may wait for its next
	// request (default 30 s).
	Idle time.Duration
	// Body is how long the body of an ordinary request may take to
	// arrive (default 30 s); uploads get Upload.
	Body time.Duration
	// Write is how long an ordinary answer may take to be sent
	// (default 10 min: some calls wait for a VM); exec waits for its
	// command's timeout. Streams (WebSockets, event streams, streamed
	// files) have no read or write deadline: they end with their work.
	Write time.Duration
	// Upload bounds files/write, body and answer (default 10 min).
	Upload time.Duration
	// MaxHeaderBytes bounds a request's headers (default 64 KiB).
	MaxHeaderBytes int
	// Recheck is how often a stream checks that the credential it was
	// opened with still stands (default 15 s).
	Recheck time.Duration
}

func (l Limits) withDefaults() Limits {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&l.ReadHeader, 10*time.Second)
	def(&l.Idle, 30*time.Second)
	def(&l.Body, 30*time.Second)
	def(&l.Write, 10*time.Minute)
	def(&l.Upload, 10*time.Minute)
	def(&l.Recheck, 15*time.Second)
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = 64 << 10
	}
	return l
}

// HTTPServer is the API's server with its connection limits; the caller
// sets nothing but the listener.
func (s *Server) HTTPServer() *http.Server {
	hs := s.server(s.Handler())
	hs.RegisterOnShutdown(s.Close) // ends event streams so shutdown need not wait for their clients
	return hs
}

// IngressServer serves sandbox ports (WRENN_INGRESS_LISTEN_ADDR): the
// Host names the capsule and port; api.<domain> is the API (so E2B's SDKs
// given only E2B_DOMAIN find it); anything else is refused.
func (s *Server) IngressServer() *http.Server {
	api := s.Handler()
	apiHost := hostOnly("api." + s.cfg.IngressDomain)
	return s.server(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t, ok, err := ingress.TargetOf(r)
		if ok {
			s.serveIngress(w, r, t, err)
			return
		}
		if hostOnly(r.Host) == apiHost {
			// api.<domain>: where E2B's SDKs look for the API given E2B_DOMAIN.
			api.ServeHTTP(w, r)
			return
		}
		ingressError(w, http.StatusNotFound, "not_found", "this is the sandbox ingress: call <port>-<capsule id>.%s, or the API at api.%s", s.cfg.IngressDomain, s.cfg.IngressDomain)
	}))
}

// hostOnly is a Host header's name, lower-cased, without its port.
func hostOnly(h string) string {
	if name, _, err := net.SplitHostPort(h); err == nil {
		h = name
	}
	return strings.ToLower(h)
}

// server is an http.Server with the API's connection limits, speaking
// HTTP/1.1 and HTTP/2 (h2c without TLS, as gRPC and Connect clients may).
func (s *Server) server(h http.Handler) *http.Server {
	l := s.cfg.Limits
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(true)
	return &http.Server{Handler: h, ReadHeaderTimeout: l.ReadHeader, IdleTimeout: l.Idle, MaxHeaderBytes: l.MaxHeaderBytes,
		Protocols: &protocols, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
}

// streams are the routes whose reads and writes last as long as their
// work: no deadline applies to them. files/read streams too.
var streams = map[string]bool{
	"/v1/capsules/{id}/exec/stream":                 true,
	"/v1/capsules/{id}/pty":                         true,
	"/v1/capsules/{id}/processes/{selector}/stream": true,
	"/v1/capsules/{id}/files/stream/write":          true,
	"/v1/capsules/{id}/files/stream/read":           true,
	"/v1/capsules/{id}/files/read":                  true,
	"/v1/events/stream":                             true,
	"/v1/admin/events/stream":                       true,
}

// setDeadlines gives an ordinary request its body and answer deadlines;
// streams get none. A request without a body gets no read deadline: the
// server's read that watches for the client going away would meet it and
// cancel the request's context half way through a long call.
func (s *Server) setDeadlines(w http.ResponseWriter, r *http.Request, rt route) {
	rc := http.NewResponseController(w)
	l := s.cfg.Limits
	read, write := l.Body, l.Write
	switch {
	case streams[rt.kind()]:
		_ = rc.SetReadDeadline(time.Time{})
		_ = rc.SetWriteDeadline(time.Time{})
		return
	case rt.kind() == "/v1/capsules/{id}/files/write":
		read, write = l.Upload, l.Upload
	}
	bodyDeadline(w, r, read)
	_ = rc.SetWriteDeadline(time.Now().Add(write))
}

// bodyDeadline gives a request's body d to arrive. The deadline is lifted
// once the body is read: the server then reads on to notice the client
// going away, and a deadline met there would cancel the request's
// context half way through a long call. A request without a body gets none.
func bodyDeadline(w http.ResponseWriter, r *http.Request, d time.Duration) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(d))
	if b, ok := r.Body.(*liftingBody); ok {
		r.Body = b.ReadCloser // a second deadline replaces the first
	}
	r.Body = &liftingBody{ReadCloser: r.Body, rc: rc}
}

// liftingBody lifts the read deadline when its body ends.
type liftingBody struct {
	io.ReadCloser
	rc *http.ResponseController
}

func (b *liftingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if errors.Is(err, io.EOF) {
		_ = b.rc.SetReadDeadline(time.Time{}) // all of it came in time
	}
	return n, err
}

// clientIP is the address a request came from: the connection's peer, or
// behind a trusted proxy the last address in X-Forwarded-For that is not
// one of the trusted proxies.
func (s *Server) clientIP(r *http.Request) netip.Addr {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	peer, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	peer = peer.Unmap()
	if !trusted(s.cfg.TrustedProxies, peer) {
		return peer
	}
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
		if err != nil {
			return peer // a malformed chain: believe only the peer
		}
		if a = a.Unmap(); !trusted(s.cfg.TrustedProxies, a) {
			return a
		}
	}
	return peer
}

// clientKey names a client for the per-address limits: its IPv4
// address, or its IPv6 /64 (one site holds a whole /64, so single
// addresses would cost it nothing to vary).
func (s *Server) clientKey(r *http.Request) string {
	a := s.clientIP(r)
	if a.Is6() {
		if p, err := a.Prefix(64); err == nil {
			return p.String()
		}
	}
	return a.String()
}

func trusted(proxies []netip.Prefix, a netip.Addr) bool {
	for _, p := range proxies {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
