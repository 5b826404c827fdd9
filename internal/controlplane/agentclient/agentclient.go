// Package agentclient reaches host agents: one Connect client per host,
// authenticated with the host's current token, reused across requests.
package agentclient

import (
	"crypto/tls"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	pb "github.com/wrenn/wrenn/proto/hostagent/v1"
	"github.com/wrenn/wrenn/proto/hostagent/v1/hostagentv1connect"
)

// Client is the agent API.
type Client = hostagentv1connect.HostAgentServiceClient

// Pool caches a client per (address, token); a new token (after a
// refresh) makes a new client.
type Pool struct {
	// TLS, when set, is used for agents whose address starts with https://.
	TLS *tls.Config

	mu      sync.Mutex
	clients map[string]Client
	plain   *http.Client
	secure  *http.Client
}

// Get returns the client for an agent at address ("ip:port" or a URL).
func (p *Pool) Get(address, token string) Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := address + "\x00" + token
	if c, ok := p.clients[key]; ok {
		return c
	}
	if p.clients == nil {
		p.clients = map[string]Client{}
		p.plain = newHTTPClient(nil)
		secure := p.TLS
		if secure == nil {
			secure = &tls.Config{MinVersion: tls.VersionTLS12} // system roots
		}
		p.secure = newHTTPClient(secure)
	}
	for k := range p.clients {
		// Forget clients holding an older token of the same agent.
		if strings.HasPrefix(k, address+"\x00") {
			delete(p.clients, k)
		}
	}
	hc, url := p.plain, address
	switch {
	case strings.HasPrefix(address, "https://"):
		hc = p.secure
	case strings.HasPrefix(address, "http://"):
	default:
		url = "http://" + address
	}
	c := hostagentv1connect.NewHostAgentServiceClient(&http.Client{Transport: bearer{token: token, next: hc.Transport}}, url)
	p.clients[key] = c
	return c
}

func newHTTPClient(tlsConfig *tls.Config) *http.Client {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	if tlsConfig == nil {
		// Agents speak HTTP/2 without TLS (h2c): streams share one connection.
		protocols.SetUnencryptedHTTP2(true)
	} else {
		protocols.SetHTTP2(true)
	}
	return &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     tlsConfig,
		Protocols:           &protocols,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
	}}
}

type bearer struct {
	token string
	next  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

// Status is the capsule status the control plane records for an agent's
// sandbox state ("" for states it does not name).
func Status(st pb.SandboxState) string {
	switch st {
	case pb.SandboxState_SANDBOX_STATE_RUNNING:
		return "running"
	case pb.SandboxState_SANDBOX_STATE_PAUSED:
		return "paused"
	case pb.SandboxState_SANDBOX_STATE_STARTING, pb.SandboxState_SANDBOX_STATE_PENDING:
		return "starting"
	case pb.SandboxState_SANDBOX_STATE_STOPPED:
		return "stopped"
	case pb.SandboxState_SANDBOX_STATE_ERROR:
		return "error"
	}
	return ""
}
