package agenttest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v1"
	"github.com/wrenn/wrenn/proto/hostagent/v1/hostagentv1connect"
)

// issue makes a certificate signed by parent (self-signed when parent is nil).
func issue(t *testing.T, name string, isCA, server bool, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey, []byte, []byte) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: isCA, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	} else if !isCA {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	keyDER, _ := x509.MarshalECPrivateKey(key)
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caPEM, _ := issue(t, "wrenn test CA", true, false, nil, nil)
	_, _, srvPEM, srvKey := issue(t, "agent", false, true, ca, caKey)
	_, _, cliPEM, cliKey := issue(t, "control plane", false, false, ca, caKey)
	_, _, strangerPEM, strangerKey := issue(t, "stranger", false, false, nil, nil) // not signed by the CA
	files := map[string][]byte{"ca.pem": caPEM, "server.pem": srvPEM, "server.key": srvKey}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
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
		"--tls-cert", filepath.Join(dir, "server.pem"), "--tls-key", filepath.Join(dir, "server.key"), "--tls-client-ca", filepath.Join(dir, "ca.pem"))
	ctx := testCtx(t, time.Minute)

	// The control plane's certificate and token: accepted.
	if _, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{})); err != nil {
		t.Fatal(err)
	}
	// A certificate the CA did not sign, or none at all: the handshake fails.
	for name, hc := range map[string]*http.Client{"no certificate": clientWith(nil, nil), "foreign certificate": clientWith(strangerPEM, strangerKey)} {
		c := hostagentv1connect.NewHostAgentServiceClient(withToken(hc, testToken), "https://"+a.addr)
		if _, err := c.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{})); err == nil {
			t.Fatalf("%s: accepted", name)
		}
	}
	// The right certificate without the token is still refused.
	c := hostagentv1connect.NewHostAgentServiceClient(clientWith(cliPEM, cliKey), "https://"+a.addr)
	_, err := c.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)
}
