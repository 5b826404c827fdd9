package registration

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/agentca"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// TestManagedCertificateRenewal drives the agent's side against a stand-in
// for the two control-plane routes that signs with a real agent CA: the
// key stays put, a due certificate is renewed at a heartbeat's refresh,
// and the TLS server serves the new one without a restart.
func TestManagedCertificateRenewal(t *testing.T) {
	ca, err := agentca.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var csrs int
	answer := func(w http.ResponseWriter, r *http.Request) {
		var in struct {
			CSR string `json:"csr"`
		}
		_ = json.NewDecoder(r.Body).Decode(&in)
		out := map[string]any{"host": map[string]string{"id": "host-1"}, "token": "jwt-" + time.Now().String(), "refresh_token": "r", "protocol": hostagentv2connect.HostAgentServiceName}
		if in.CSR != "" {
			csrs++
			cert, err := ca.SignHost([]byte(in.CSR), "host-1", "10.0.0.5:50051")
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			out["certificate"], out["ca_certificate"] = string(cert), string(ca.CertPEM())
		}
		_ = json.NewEncoder(w).Encode(out)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/hosts/register", answer)
	mux.HandleFunc("POST /v1/hosts/auth/refresh", answer)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	dir := t.TempDir()
	c, err := Register(context.Background(), dir, srv.URL, "token", Specs{Address: "https://10.0.0.5:50051"}, true)
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := Load(dir)
	if err != nil || !loaded.ManagedTLS {
		t.Fatalf("saved credentials lost managed TLS: %v", err)
	}
	cfg, err := loaded.ServerTLS()
	if err != nil {
		t.Fatal(err)
	}
	first, _ := cfg.GetCertificate(nil)
	if loaded.certificateDue() {
		t.Fatal("a fresh 90-day certificate is due for renewal")
	}
	// A refresh while the certificate is fresh sends no request.
	if err := loaded.Refresh(context.Background()); err != nil || csrs != 1 {
		t.Fatalf("refresh: %v, %d requests", err, csrs)
	}
	// Make the served certificate one that ends tomorrow (same key): the
	// next heartbeat's refresh must renew it.
	key, err := loadOrMakeKey(filepath.Join(dir, TLSKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	loaded.cert.Store(&tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key})
	if !loaded.certificateDue() {
		t.Fatal("a certificate ending tomorrow is not due")
	}
	if err := loaded.Refresh(context.Background()); err != nil || csrs != 2 {
		t.Fatalf("renewing refresh: %v, %d requests", err, csrs)
	}
	served, _ := cfg.GetCertificate(nil)
	leaf, _ := x509.ParseCertificate(served.Certificate[0])
	firstLeaf, _ := x509.ParseCertificate(first.Certificate[0])
	if leaf.SerialNumber.Cmp(firstLeaf.SerialNumber) == 0 || leaf.SerialNumber.Int64() == 7 || time.Until(leaf.NotAfter) < 89*24*time.Hour {
		t.Fatalf("served after renewal: serial %v until %v", leaf.SerialNumber, leaf.NotAfter)
	}
	onDisk, err := tls.LoadX509KeyPair(filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile))
	if err != nil || string(onDisk.Certificate[0]) != string(served.Certificate[0]) {
		t.Fatalf("renewed certificate not saved: %v", err)
	}
	if c.HostID != "host-1" {
		t.Fatalf("host %q", c.HostID)
	}
}

func TestCertificateDueFollowsExpiry(t *testing.T) {
	ca, err := agentca.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	csr, err := certRequest(dir)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := certRequest(dir)
	if block, _ := pem.Decode([]byte(again)); block == nil {
		t.Fatal("second request not PEM")
	}
	cert, err := ca.SignHost([]byte(csr), "h", "10.0.0.5:1")
	if err != nil {
		t.Fatal(err)
	}
	c := &Credentials{dir: dir, ManagedTLS: true}
	if !c.certificateDue() {
		t.Fatal("no certificate yet, but not due")
	}
	if err := c.saveCertificate(string(cert), string(ca.CertPEM())); err != nil {
		t.Fatal(err)
	}
	if c.certificateDue() || time.Until(c.CertificateExpiry()) < 89*24*time.Hour {
		t.Fatalf("fresh certificate due or short: %v", c.CertificateExpiry())
	}
}

// An agent registering with a control plane that calls another protocol
// (upstream Wrenn's answers no protocol) says so and saves nothing.
func TestRegisterRefusesAControlPlaneOfAnotherProtocol(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"host": map[string]string{"id": "host-1"}, "token": "jwt", "refresh_token": "r"})
	}))
	defer srv.Close()
	dir := t.TempDir()
	_, err := Register(context.Background(), dir, srv.URL, "token", Specs{Address: "10.0.0.5:50051"}, false)
	if err == nil || !strings.Contains(err.Error(), "agent protocol") {
		t.Fatalf("registered with a control plane of another protocol: %v", err)
	}
	if _, err := Load(dir); err == nil {
		t.Fatal("credentials were saved")
	}
}
