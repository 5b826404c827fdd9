package registration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Files of a managed TLS identity under WRENN_DIR (--managed-tls): the
// agent's key never leaves the host; the control plane signs a request
// for it and returns the certificate and its CA.
const (
	TLSKeyFile  = "agent-tls.key"
	TLSCertFile = "agent-tls.crt"
	TLSCAFile   = "cp-ca.crt"
)

// renewBefore is how long before expiry the agent asks for a new
// certificate (it is valid 90 days).
const renewBefore = 30 * 24 * time.Hour

// certRequest returns a PEM certificate request for the agent's TLS key,
// making the key on first use.
func certRequest(dir string) (string, error) {
	key, err := loadOrMakeKey(filepath.Join(dir, TLSKeyFile))
	if err != nil {
		return "", err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "wrenn-agent"}}, key)
	if err != nil {
		return "", fmt.Errorf("certificate request: %w", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), nil
}

func loadOrMakeKey(path string) (*ecdsa.PrivateKey, error) {
	if data, err := os.ReadFile(path); err == nil {
		block, _ := pem.Decode(data)
		if block == nil {
			return nil, fmt.Errorf("%s holds no PEM key", path)
		}
		return x509.ParseECPrivateKey(block.Bytes)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	if err := writeFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})); err != nil {
		return nil, err
	}
	return key, nil
}

// saveCertificate keeps what the control plane signed and makes it the
// certificate the agent serves.
func (c *Credentials) saveCertificate(certPEM, caPEM string) error {
	if certPEM == "" || caPEM == "" {
		return errors.New("the control plane sent no certificate: it does not run the agent CA (WRENN_AGENT_CA_DIR)")
	}
	pair, err := tls.X509KeyPair([]byte(certPEM), mustRead(filepath.Join(c.dir, TLSKeyFile)))
	if err != nil {
		return fmt.Errorf("certificate from the control plane: %w", err)
	}
	if err := writeFile(filepath.Join(c.dir, TLSCAFile), []byte(caPEM)); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(c.dir, TLSCertFile), []byte(certPEM)); err != nil {
		return err
	}
	c.cert.Store(&pair)
	return nil
}

func mustRead(path string) []byte {
	data, _ := os.ReadFile(path)
	return data
}

// ServerTLS is the RPC server's TLS for a managed identity: the signed
// certificate (swapped in place when renewed) and mutual TLS with the
// control plane's CA.
func (c *Credentials) ServerTLS() (*tls.Config, error) {
	if c.cert.Load() == nil {
		pair, err := tls.LoadX509KeyPair(filepath.Join(c.dir, TLSCertFile), filepath.Join(c.dir, TLSKeyFile))
		if err != nil {
			return nil, fmt.Errorf("managed TLS certificate: %w (register the host again)", err)
		}
		c.cert.Store(&pair)
	}
	caPEM, err := os.ReadFile(filepath.Join(c.dir, TLSCAFile))
	if err != nil {
		return nil, fmt.Errorf("managed TLS: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s holds no certificate", TLSCAFile)
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"},
		ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.cert.Load(), nil },
	}, nil
}

// CertificateExpiry is when the served certificate ends (zero without one).
func (c *Credentials) CertificateExpiry() time.Time {
	pair := c.cert.Load()
	if pair == nil {
		return time.Time{}
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return time.Time{}
	}
	return leaf.NotAfter
}

func (c *Credentials) certificateDue() bool {
	return c.ManagedTLS && time.Until(c.CertificateExpiry()) < renewBefore
}
