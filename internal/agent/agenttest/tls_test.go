package agenttest

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/testutil/testcerts"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.Issue(t, dir, "ca", testcerts.CA, nil)
	srv := testcerts.Issue(t, dir, "server", testcerts.Server, ca)
	cli := testcerts.Issue(t, dir, "client", testcerts.Client, ca)
	stranger := testcerts.Issue(t, dir, "stranger", testcerts.Client, nil) // not signed by the CA
	cliPEM, cliKey := cli.CertPEM, cli.KeyPEM
	strangerPEM, strangerKey := stranger.CertPEM, stranger.KeyPEM
	roots := x509.NewCertPool()
	roots.AddCert(ca.X509)
	clientWith := func(certPEM, keyPEM []byte) *http.Client {
		cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
		if certPEM != nil {
			pair, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}}
	}
	a := newAgentWith(t, clientWith(cliPEM, cliKey), "https",
		"--tls-cert", srv.CertFile, "--tls-key", srv.KeyFile, "--tls-client-ca", ca.CertFile)
	ctx := testCtx(t, time.Minute)

	// The control plane's certificate and token: accepted.
	if _, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{})); err != nil {
		t.Fatal(err)
	}
	// A certificate the CA did not sign, or none at all: the handshake fails.
	for name, hc := range map[string]*http.Client{"no certificate": clientWith(nil, nil), "foreign certificate": clientWith(strangerPEM, strangerKey)} {
		c := hostagentv2connect.NewHostAgentServiceClient(withToken(hc, testToken), "https://"+a.addr)
		if _, err := c.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{})); err == nil {
			t.Fatalf("%s: accepted", name)
		}
	}
	// The right certificate without the token is still refused.
	c := hostagentv2connect.NewHostAgentServiceClient(clientWith(cliPEM, cliKey), "https://"+a.addr)
	_, err := c.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)
}
