package api

import (
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"
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
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = 64 << 10
	}
	return l
}

// HTTPServer is the API's server with its connection limits; the caller
// sets nothing but the listener.
func (s *Server) HTTPServer() *http.Server {
	l := s.cfg.Limits
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: l.ReadHeader, IdleTimeout: l.Idle, MaxHeaderBytes: l.MaxHeaderBytes,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
	hs.RegisterOnShutdown(s.Close) // ends event streams so shutdown need not wait for their clients
	return hs
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
// streams get none.
func (s *Server) setDeadlines(w http.ResponseWriter, rt route) {
	rc := http.NewResponseController(w)
	l := s.cfg.Limits
	switch {
	case streams[rt.path]:
		_ = rc.SetReadDeadline(time.Time{})
		_ = rc.SetWriteDeadline(time.Time{})
	case rt.path == "/v1/capsules/{id}/files/write":
		_ = rc.SetReadDeadline(time.Now().Add(l.Upload))
		_ = rc.SetWriteDeadline(time.Now().Add(l.Upload))
	default:
		_ = rc.SetReadDeadline(time.Now().Add(l.Body))
		_ = rc.SetWriteDeadline(time.Now().Add(l.Write))
	}
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

func trusted(proxies []netip.Prefix, a netip.Addr) bool {
	for _, p := range proxies {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
