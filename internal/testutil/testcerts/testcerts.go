// Package testcerts makes a throwaway CA with server and client
// certificates for TLS tests, written as PEM files.
package testcerts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Kind says what a certificate is for.
type Kind int

// Certificate kinds.
const (
	CA     Kind = iota
	Server      // for 127.0.0.1, and for name when it is a DNS name ("*.sandboxes.test")
	Client
)

// Cert is an issued certificate with its key, in memory and on disk.
type Cert struct {
	X509              *x509.Certificate
	Key               *ecdsa.PrivateKey
	CertPEM, KeyPEM   []byte
	CertFile, KeyFile string
}

// Issue makes a certificate named name, signed by parent (self-signed
// when parent is nil), and writes it to dir as name.pem and name.key.
func Issue(t testing.TB, dir, name string, kind Kind, parent *Cert) *Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: kind == CA, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	switch kind {
	case Server:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		if strings.Contains(name, ".") && net.ParseIP(name) == nil {
			tmpl.DNSNames = []string{name}
		}
	case Client:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent.X509, parent.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	keyDER, _ := x509.MarshalECPrivateKey(key)
	c := &Cert{X509: cert, Key: key,
		CertPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		CertFile: filepath.Join(dir, fileName(name)+".pem"), KeyFile: filepath.Join(dir, fileName(name)+".key")}
	if err := os.WriteFile(c.CertFile, c.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.KeyFile, c.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// fileName keeps a wildcard's star out of file names.
func fileName(name string) string { return strings.ReplaceAll(name, "*", "wildcard") }
