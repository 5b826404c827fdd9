package agentclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSConfig builds the client side of TLS to agents that serve it
// (registered as https://host:port): caFile verifies their certificates
// (empty: the system roots), certFile and keyFile are the control plane's
// own certificate for agents that require mutual TLS. It returns nil when
// all three are empty.
func TLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("agent CA: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("agent CA %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = roots
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("the control plane's client certificate needs both a certificate and a key file")
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("control plane client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}
