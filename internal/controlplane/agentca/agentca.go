// Package agentca is the certificate authority a control plane may run for
// mutual TLS with its agents. An agent registering (or refreshing its
// token) sends a certificate request for its own key; the control plane
// signs a server certificate for the address the host registered, and
// calls agents with a client certificate of its own from the same CA.
// Neither the CA key nor the client key is in the database: whoever reads
// the database gets the host JWTs but cannot complete a TLS handshake with
// an agent.
package agentca

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
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Validity of what the CA issues. Agents renew at their heartbeat when
// less than RenewBefore is left.
const (
	caValidity     = 10 * 365 * 24 * time.Hour
	HostValidity   = 90 * 24 * time.Hour
	RenewBefore    = 30 * 24 * time.Hour
	clientValidity = 365 * 24 * time.Hour
)

// Files in the CA's directory.
const (
	certFile = "agent-ca.crt"
	keyFile  = "agent-ca.key"
)

// ErrBadRequest means a certificate request was not acceptable.
var ErrBadRequest = errors.New("bad certificate request")

// CA signs agents' certificates.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
	client  tls.Certificate
}

// Open loads the CA kept in dir, creating it (and dir) on first use. Every
// control-plane replica must open the same files.
func Open(dir string) (*CA, error) {
	certPEM, certErr := os.ReadFile(filepath.Join(dir, certFile))
	keyPEM, keyErr := os.ReadFile(filepath.Join(dir, keyFile))
	if errors.Is(certErr, os.ErrNotExist) && errors.Is(keyErr, os.ErrNotExist) {
		var err error
		if certPEM, keyPEM, err = create(dir); err != nil {
			return nil, err
		}
	} else if certErr != nil || keyErr != nil {
		return nil, fmt.Errorf("agent CA in %s: %w", dir, errors.Join(certErr, keyErr))
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("agent CA in %s: %w", dir, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("agent CA in %s: the key is not ECDSA", dir)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("agent CA in %s: %s is not a CA certificate", dir, certFile)
	}
	ca := &CA{cert: cert, certPEM: certPEM, key: key}
	if ca.client, err = ca.issueClient(); err != nil {
		return nil, err
	}
	return ca, nil
}

func create(dir string) (certPEM, keyPEM []byte, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("agent CA: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Wrenn agent CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	// The key first: a certificate without its key would block the next start.
	if err := writeNew(filepath.Join(dir, keyFile), keyPEM, 0o600); err != nil {
		return nil, nil, err
	}
	if err := writeNew(filepath.Join(dir, certFile), certPEM, 0o644); err != nil {
		return nil, nil, err
	}
	return certPEM, keyPEM, nil
}

// writeNew creates path, failing if it exists (two replicas starting at
// once must not each make a CA).
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("agent CA: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("agent CA: %w", err)
	}
	return f.Close()
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	return n
}

// CertPEM is the CA certificate agents trust for the control plane's
// client certificate.
func (ca *CA) CertPEM() []byte { return ca.certPEM }

func (ca *CA) issueClient() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "wrenn-cp"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(clientValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("control plane client certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// ClientTLS is how the control plane dials agents: it trusts only this CA
// and presents its client certificate (made at start, never stored).
func (ca *CA) ClientTLS() *tls.Config {
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, Certificates: []tls.Certificate{ca.client}}
}

// SignHost signs the certificate request csrPEM of host hostID as a
// server certificate for address, the host's registered address
// ("https://10.0.0.5:50051" or "10.0.0.5:50051"): the names in the
// request are ignored, the control plane decides what the host is.
func (ca *CA) SignHost(csrPEM []byte, hostID, address string) ([]byte, error) {
	csr, err := parseRequest(csrPEM)
	if err != nil {
		return nil, err
	}
	host := address
	if u, err := url.Parse(address); err == nil && u.Host != "" {
		host = u.Host
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if host == "" {
		return nil, fmt.Errorf("%w: the host has no address to certify", ErrBadRequest)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hostID},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(HostValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, csr.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// CheckRequest tells whether csrPEM is a well-formed, self-signed
// certificate request, before anything is done on its behalf.
func CheckRequest(csrPEM []byte) error {
	_, err := parseRequest(csrPEM)
	return err
}

func parseRequest(csrPEM []byte) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: not a PEM CERTIFICATE REQUEST", ErrBadRequest)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrBadRequest, err)
	}
	return csr, nil
}
