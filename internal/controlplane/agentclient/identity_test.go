package agentclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net/http/httptest"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentca"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// An agent serving a certificate the control plane's CA issued to one
// host is accepted when that host is called, and refused when another
// host registered at the same address is: the CA's signature alone does
// not make an agent the host the control plane meant to reach.
func TestHostIdentity(t *testing.T) {
	ca, err := agentca.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "anything"}}, key)
	certPEM, err := ca.SignHost(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), "host-a", "https://127.0.0.1:50051")
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	pair, err := tls.X509KeyPair(certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		t.Fatal(err)
	}
	_, h := hostagentv2connect.NewHostAgentServiceHandler(hostagentv2connect.UnimplementedHostAgentServiceHandler{})
	srv := httptest.NewUnstartedServer(h)
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	srv.StartTLS()
	defer srv.Close()
	address := "https://" + srv.Listener.Addr().String()

	pool := &Pool{TLS: ca.ClientTLS(), HostIdentity: true}
	_, err = pool.Get("host-a", address, "token").GetHostInfo(context.Background(), connect.NewRequest(&pb.GetHostInfoRequest{}))
	if connect.CodeOf(err) != connect.CodeUnimplemented {
		t.Fatalf("calling the host the certificate names: %v", err)
	}
	_, err = pool.Get("host-b", address, "token").GetHostInfo(context.Background(), connect.NewRequest(&pb.GetHostInfoRequest{}))
	if err == nil || !strings.Contains(err.Error(), `certificate is for "host-a", not for host host-b`) {
		t.Fatalf("another host's certificate was accepted: %v", err)
	}
	if msg := Message(err); strings.Contains(msg, "host-a") {
		t.Fatalf("the tenant's message tells about the other host: %q", msg)
	}
}
