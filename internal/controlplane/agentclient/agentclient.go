// Package agentclient reaches host agents: one Connect client per host,
// authenticated with the host's current token, reused across requests.
package agentclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/readlimit"
	"github.com/wrenn/wrenn/internal/safetext"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// Client is the agent API.
type Client = hostagentv2connect.HostAgentServiceClient

// MaxMessage bounds one answer from an agent: agents (BYOC ones above
// all) are less trusted than the control plane. The agent's own unary
// answers (an exec's output, a directory listing) stay below it; files
// travel in chunks through the streaming calls, whose messages are
// bounded by maxStreamMessage (the agent sends 256 KiB at most).
const (
	MaxMessage       = 4 << 20
	maxStreamMessage = 1 << 20
)

// maxHeaderBytes bounds an agent's response headers.
const maxHeaderBytes = 64 << 10

// Pool caches a client per (host, address, token); a new token (after a
// refresh) makes a new client.
type Pool struct {
	// TLS, when set, is used for agents whose address starts with https://.
	TLS *tls.Config
	// HostIdentity requires an agent's TLS certificate to name the host
	// being called (its subject common name is the host ID, as the
	// control plane's own CA issues them), not only to be signed by a
	// trusted CA: one host's certificate cannot stand in for another's.
	HostIdentity bool

	mu      sync.Mutex
	clients map[string]Client
	plain   *http.Client
	secure  *http.Client
	perHost map[string]*http.Client     // with HostIdentity, by host ID
	tunnels map[string]*tunnelTransport // by host, sandbox and port
}

// Get returns the client for host hostID's agent at address ("ip:port"
// or a URL).
func (p *Pool) Get(hostID, address, token string) Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := hostID + "\x00" + address + "\x00" + token
	if c, ok := p.clients[key]; ok {
		return c
	}
	if p.clients == nil {
		p.clients = map[string]Client{}
		p.perHost = map[string]*http.Client{}
		p.plain = newHTTPClient(nil)
		p.secure = newHTTPClient(p.tlsConfig())
	}
	for k := range p.clients {
		// Forget clients holding an older token or address of the same host.
		if strings.HasPrefix(k, hostID+"\x00") {
			delete(p.clients, k)
		}
	}
	hc, url := p.plain, address
	switch {
	case strings.HasPrefix(address, "https://"):
		hc = p.secure
		if p.HostIdentity {
			hc = p.hostClient(hostID)
		}
	case strings.HasPrefix(address, "http://"):
	default:
		url = "http://" + address
	}
	// No compression: a compressed answer is how a small reply becomes a
	// large allocation, and agents sit on fast links.
	limited := &readlimit.Transport{Next: hc.Transport, MaxBody: MaxMessage + 64<<10, MaxMessage: maxStreamMessage}
	c := hostagentv2connect.NewHostAgentServiceClient(&http.Client{Transport: bearer{token: token, next: limited}}, url,
		connect.WithReadMaxBytes(MaxMessage), connect.WithAcceptCompression("gzip", nil, nil), connect.WithInterceptors(deadlines{}))
	p.clients[key] = c
	return c
}

func (p *Pool) tlsConfig() *tls.Config {
	if p.TLS == nil {
		return &tls.Config{MinVersion: tls.VersionTLS12} // system roots
	}
	return p.TLS.Clone()
}

// hostClient is the HTTP client for one host whose certificate must name it.
func (p *Pool) hostClient(hostID string) *http.Client {
	if hc, ok := p.perHost[hostID]; ok {
		return hc
	}
	cfg := p.tlsConfig()
	cfg.VerifyConnection = verifyHost(hostID)
	hc := newHTTPClient(cfg)
	p.perHost[hostID] = hc
	return hc
}

// verifyHost accepts only a certificate whose common name is hostID.
func verifyHost(hostID string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].Subject.CommonName != hostID {
			name := ""
			if len(cs.PeerCertificates) > 0 {
				name = cs.PeerCertificates[0].Subject.CommonName
			}
			return fmt.Errorf("the agent's certificate is for %q, not for host %s", name, hostID)
		}
		return nil
	}
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
		// Dialled agents must answer the TLS handshake and send headers in time.
		TLSHandshakeTimeout:    10 * time.Second,
		DisableCompression:     true,
		MaxResponseHeaderBytes: maxHeaderBytes,
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
	case pb.SandboxState_SANDBOX_STATE_PAUSING:
		return "pausing"
	case pb.SandboxState_SANDBOX_STATE_RESUMING:
		return "resuming"
	}
	return ""
}

// maxErrorText bounds an agent's error message passed on to tenants.
const maxErrorText = 512

// Message says what went wrong with a call to an agent in words fit for a
// tenant: an error the agent answered keeps its message, bounded and
// printable; a failure to reach it or to read its answer is described
// without echoing what the other end sent (a registered address may be
// anything that answers, and its bytes are no tenant's business).
func Message(err error) string {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		if errors.Is(err, context.DeadlineExceeded) {
			return "the host agent did not answer in time"
		}
		return "the host agent cannot be reached"
	}
	if connect.IsWireError(ce) {
		return safetext.Clip(ce.Message(), maxErrorText)
	}
	switch ce.Code() {
	case connect.CodeResourceExhausted:
		return fmt.Sprintf("the host agent's answer is larger than %d MiB, the most the control plane accepts", MaxMessage>>20)
	case connect.CodeDeadlineExceeded:
		return "the host agent did not answer in time"
	case connect.CodeCanceled:
		return "the call to the host agent was cancelled"
	default:
		return "the host agent cannot be reached or did not answer as an agent"
	}
}
