package agentclient

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// TunnelHeader carries the host token on a CONNECT to an agent (package
// internal/agent/proxy), apart from any Authorization of the client's.
const TunnelHeader = "Wrenn-Agent-Authorization"

// Bounds on what an agent's answer to a CONNECT may hold.
const (
	maxTunnelRefusal = 64 << 10
	// maxProxyHeaderBytes bounds the response headers a server in a
	// sandbox sends through a tunnel.
	maxProxyHeaderBytes = 1 << 20
	// idleTunnels is how many idle tunnels one sandbox port keeps.
	idleTunnels = 16
	// tunnelIdle is how long an idle tunnel is kept.
	tunnelIdle = 60 * time.Second
)

// TunnelRefused is an agent's refusal of a tunnel (the sandbox is not
// there, not running, or nothing listens on the port), with its answer.
type TunnelRefused struct {
	Status int
	Body   []byte // the agent's JSON error, bounded
}

func (e *TunnelRefused) Error() string {
	return fmt.Sprintf("the agent refused the tunnel: %d %s", e.Status, safeText(e.Body))
}

func safeText(b []byte) string {
	if len(b) > maxErrorText {
		b = b[:maxErrorText]
	}
	return strings.ToValidUTF8(string(b), "?")
}

type tunnelTransport struct {
	t        *http.Transport
	lastUsed time.Time
}

// Tunnel returns the transport that reaches port of sandboxID on host
// hostID's agent at address: each of its connections is a CONNECT
// tunnel through the agent (TLS when the address is https, checking the
// host's identity as Get does), over which HTTP/1.1 goes to the server in
// the sandbox untouched. Transports are kept per sandbox port, so idle
// connections are never reused for another sandbox.
func (p *Pool) Tunnel(hostID, address, token, sandboxID string, port int) http.RoundTripper {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := strings.Join([]string{hostID, address, token, sandboxID, strconv.Itoa(port)}, "\x00")
	now := time.Now()
	if tt, ok := p.tunnels[key]; ok {
		tt.lastUsed = now
		return tt.t
	}
	if p.tunnels == nil {
		p.tunnels = map[string]*tunnelTransport{}
	}
	for k, tt := range p.tunnels {
		// Forget what an older token or address of the host made, and
		// transports unused for a while.
		if strings.HasPrefix(k, hostID+"\x00") && !strings.HasPrefix(k, hostID+"\x00"+address+"\x00"+token+"\x00") || now.Sub(tt.lastUsed) > 5*time.Minute {
			tt.t.CloseIdleConnections()
			delete(p.tunnels, k)
		}
	}
	var tlsConfig *tls.Config
	agentAddr := strings.TrimPrefix(strings.TrimPrefix(address, "http://"), "https://")
	if strings.HasPrefix(address, "https://") {
		tlsConfig = p.tlsConfig()
		if p.HostIdentity {
			tlsConfig.VerifyConnection = verifyHost(hostID)
		}
		tlsConfig.NextProtos = []string{"http/1.1"}
		if tlsConfig.ServerName == "" {
			tlsConfig.ServerName, _, _ = net.SplitHostPort(agentAddr)
		}
	}
	target := net.JoinHostPort(sandboxID, strconv.Itoa(port))
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return dialTunnel(ctx, agentAddr, tlsConfig, token, target)
	}
	t := &http.Transport{
		DialContext:            dial,
		MaxIdleConnsPerHost:    idleTunnels,
		IdleConnTimeout:        tunnelIdle,
		ExpectContinueTimeout:  time.Second,
		DisableCompression:     true,
		MaxResponseHeaderBytes: maxProxyHeaderBytes,
	}
	p.tunnels[key] = &tunnelTransport{t: t, lastUsed: now}
	return t
}

// ForgetTunnels closes the idle tunnels into a sandbox (it paused or was
// destroyed: the next request opens a fresh one).
func (p *Pool) ForgetTunnels(sandboxID string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, tt := range p.tunnels {
		if strings.Contains(k, "\x00"+sandboxID+"\x00") {
			tt.t.CloseIdleConnections()
			delete(p.tunnels, k)
		}
	}
}

// dialTunnel connects to the agent, asks for a tunnel to target and
// returns the connection once the agent has opened it.
func dialTunnel(ctx context.Context, agentAddr string, tlsConfig *tls.Config, token, target string) (net.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
	var conn net.Conn
	var err error
	if tlsConfig != nil {
		conn, err = (&tls.Dialer{NetDialer: d, Config: tlsConfig}).DialContext(ctx, "tcp", agentAddr)
	} else {
		conn, err = d.DialContext(ctx, "tcp", agentAddr)
	}
	if err != nil {
		return nil, err
	}
	// The agent must answer the CONNECT in time; the tunnel then has no deadline.
	deadline := time.Now().Add(15 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n" + TunnelHeader + ": Bearer " + token + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReaderSize(conn, 4096)
	res, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read the agent's answer to CONNECT: %w", err)
	}
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(res.Body, maxTunnelRefusal))
		res.Body.Close()
		conn.Close()
		return nil, &TunnelRefused{Status: res.StatusCode, Body: body}
	}
	_ = conn.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		// A server that spoke first (before any request) already sent bytes.
		return &bufferedConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

// bufferedConn reads what the handshake's reader holds before the
// connection itself.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
