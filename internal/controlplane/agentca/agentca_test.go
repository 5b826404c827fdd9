package agentca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func request(t *testing.T) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// The request names something else: the CA must ignore it.
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{"evil.example"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), key
}

func parse(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("no PEM certificate")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func TestCAIssuesWhatTheControlPlaneDecides(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, keyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key file: %v %v", fi, err)
	}
	again, err := Open(dir)
	if err != nil || string(again.CertPEM()) != string(ca.CertPEM()) {
		t.Fatalf("reopening made another CA: %v", err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CertPEM())

	csr, key := request(t)
	certPEM, err := ca.SignHost(csr, "host-1", "https://10.0.0.5:50051")
	if err != nil {
		t.Fatal(err)
	}
	cert := parse(t, certPEM)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "10.0.0.5", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("host certificate does not verify for its address: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "evil.example"}); err == nil {
		t.Fatal("the certificate took a name from the request")
	}
	if cert.Subject.CommonName != "host-1" || !cert.PublicKey.(*ecdsa.PublicKey).Equal(&key.PublicKey) {
		t.Fatalf("subject %q or key not the request's", cert.Subject.CommonName)
	}
	if byName, err := ca.SignHost(csr, "host-2", "agent.internal:50051"); err != nil || parse(t, byName).DNSNames[0] != "agent.internal" {
		t.Fatalf("DNS address: %v", err)
	}

	// The control plane's client certificate is from the same CA, for clients only.
	client := ca.ClientTLS().Certificates[0]
	leaf, _ := x509.ParseCertificate(client.Certificate[0])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("client certificate: %v", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Fatal("the client certificate also serves")
	}
}

func TestCARefusesBadRequests(t *testing.T) {
	ca, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	csr, _ := request(t)
	block, _ := pem.Decode(csr)
	block.Bytes[len(block.Bytes)-3] ^= 0xff // break the signature
	tampered := pem.EncodeToMemory(block)
	for name, in := range map[string][]byte{"empty": nil, "garbage": []byte("hello"), "tampered": tampered,
		"a certificate": ca.CertPEM()} {
		if _, err := ca.SignHost(in, "h", "10.0.0.5:1"); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: %v", name, err)
		}
		if err := CheckRequest(in); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: CheckRequest %v", name, err)
		}
	}
	if _, err := ca.SignHost(csr, "h", ""); !errors.Is(err, ErrBadRequest) {
		t.Errorf("no address: %v", err)
	}
	// Half a CA on disk is an error, not a new CA.
	dir := t.TempDir()
	if _, err := Open(dir); err != nil {
		t.Fatal(err)
	}
	_ = os.Remove(filepath.Join(dir, keyFile))
	if _, err := Open(dir); err == nil {
		t.Fatal("opened a CA without its key")
	}
}
