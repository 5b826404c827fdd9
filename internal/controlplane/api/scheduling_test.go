package api

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/agentca"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/testutil/pgtest"
	"github.com/wrenn/wrenn/internal/testutil/testcerts"
)

// Two real agents on one machine (disjoint network slot ranges): capsules
// spread over them by load, tags constrain placement, and a create whose
// chosen host has died moves to the other host without a half-made record.
func TestSchedulingAcrossTwoAgents(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	hostA, stopA := c.startAgent(admin, "--slots", "1-1000")
	hostB, _ := c.startAgent(admin, "--slots", "1001-2000")
	key := c.apiKey(admin)
	create := func(body map[string]any) capsuleOut {
		t.Helper()
		var sb capsuleOut
		body["memory_mb"] = 256
		c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, body), 201).json(t, &sb)
		return sb
	}
	var made []capsuleOut
	t.Cleanup(func() {
		for _, sb := range made {
			c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil)
		}
	})

	first := create(map[string]any{})
	second := create(map[string]any{})
	made = append(made, first, second)
	if first.HostID == second.HostID {
		t.Fatalf("both capsules on %s: the scheduler did not spread by load", first.HostID)
	}
	for _, sb := range []capsuleOut{first, second} {
		if out, code := c.exec(key, sb.ID, "echo", "on "+sb.HostID); code != 0 || out != "on "+sb.HostID+"\n" {
			t.Fatalf("exec on %s: %q %d", sb.HostID, out, code)
		}
	}

	// Tags are constraints: only B carries "fast-disk".
	c.want(c.do("POST", "/v1/hosts/"+hostB+"/tags", creds{jwt: admin.jwt}, map[string]string{"tag": "fast-disk"}), 204)
	tagged := create(map[string]any{"host_tags": []string{"fast-disk"}})
	made = append(made, tagged)
	if tagged.HostID != hostB {
		t.Fatalf("tagged capsule on %s, want %s", tagged.HostID, hostB)
	}
	c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"memory_mb": 256, "host_tags": []string{"gpu"}}), 503)

	// A is now the least loaded. Its agent dies (its heartbeat has not yet
	// been missed, so it is still scheduled): the create moves to B.
	onA := first
	if second.HostID == hostA {
		onA = second
	}
	c.want(c.do("DELETE", "/v1/capsules/"+onA.ID, creds{key: key}, nil), 204)
	stopA()
	moved := create(map[string]any{})
	made = append(made, moved)
	if moved.HostID != hostB {
		t.Fatalf("create after host A died: on %s, want %s", moved.HostID, hostB)
	}
	if out, _ := c.exec(key, moved.ID, "echo", "moved"); out != "moved\n" {
		t.Fatalf("moved capsule: %q", out)
	}
	var all []capsuleOut
	c.want(c.do("GET", "/v1/capsules", creds{key: key}, nil), 200).json(t, &all)
	for _, sb := range all {
		if sb.Status != "running" && sb.Status != "stopped" {
			t.Fatalf("a capsule was left %s: %+v", sb.Status, sb)
		}
	}
}

// An agent serving mutual TLS registers as https://; the control plane
// verifies it with the operator's CA and presents its own certificate.
func TestAgentOverMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.Issue(t, dir, "ca", testcerts.CA, nil)
	agentCert := testcerts.Issue(t, dir, "agent", testcerts.Server, ca)
	cpCert := testcerts.Issue(t, dir, "control-plane", testcerts.Client, ca)
	tlsCfg, err := agentclient.TLSConfig(ca.CertFile, cpCert.CertFile, cpCert.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Agents = &agentclient.Pool{TLS: tlsCfg}
	})
	admin := c.signup("admin@example.com")
	hostID, _ := c.startAgent(admin, "--tls-cert", agentCert.CertFile, "--tls-key", agentCert.KeyFile, "--tls-client-ca", ca.CertFile)
	var h struct{ Address string }
	c.want(c.do("GET", "/v1/hosts/"+hostID, creds{jwt: admin.jwt}, nil), 200).json(t, &h)
	if !strings.HasPrefix(h.Address, "https://127.0.0.1:") {
		t.Fatalf("registered address %q", h.Address)
	}
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &sb)
	if out, code := c.exec(key, sb.ID, "echo", "over tls"); out != "over tls\n" || code != 0 {
		t.Fatalf("exec over TLS: %q %d", out, code)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
}

// The control plane runs the agent CA: an agent registered with
// --managed-tls gets a certificate for its address, the control plane
// calls it over mutual TLS with a client certificate of its own, nobody
// else completes a handshake, and a refresh renews the certificate.
func TestManagedAgentTLS(t *testing.T) {
	ca, err := agentca.Open(filepath.Join(t.TempDir(), "agent-ca"))
	if err != nil {
		t.Fatal(err)
	}
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Agents = &agentclient.Pool{TLS: ca.ClientTLS(), HostIdentity: true}
		cfg.AgentCA = ca
	})
	admin := c.signup("admin@example.com")
	a := c.startAgentProc(admin, "--managed-tls")
	var h struct{ Address string }
	c.want(c.do("GET", "/v1/hosts/"+a.hostID, creds{jwt: admin.jwt}, nil), 200).json(t, &h)
	if h.Address != "https://"+a.addr {
		t.Fatalf("registered address %q, want https://%s", h.Address, a.addr)
	}
	if fi, err := os.Stat(filepath.Join(a.dir, "agent-tls.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("agent key: %v %v", fi, err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CertPEM())
	served := func(cfg *tls.Config) (*x509.Certificate, error) {
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		resp, err := hc.Get("https://" + a.addr + "/")
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		return resp.TLS.PeerCertificates[0], nil
	}

	// The control plane's own calls work: a capsule's whole life.
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &sb)
	if out, code := c.exec(key, sb.ID, "echo", "over managed tls"); out != "over managed tls\n" || code != 0 {
		t.Fatalf("exec: %q %d", out, code)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)

	// What the agent serves is the CA's certificate for its address.
	cert, err := served(ca.ClientTLS())
	if err != nil {
		t.Fatalf("control plane's TLS: %v", err)
	}
	if cert.Subject.CommonName != a.hostID || len(cert.IPAddresses) != 1 || cert.IPAddresses[0].String() != "127.0.0.1" {
		t.Fatalf("served certificate %q %v", cert.Subject.CommonName, cert.IPAddresses)
	}
	// Nobody without the control plane's client certificate gets in.
	if _, err := served(&tls.Config{RootCAs: roots}); err == nil {
		t.Fatal("a client without a certificate completed a request")
	}
	other := testcerts.Issue(t, t.TempDir(), "other-ca", testcerts.CA, nil)
	intruder := testcerts.Issue(t, t.TempDir(), "intruder", testcerts.Client, other)
	pair, err := tls.LoadX509KeyPair(intruder.CertFile, intruder.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := served(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}}); err == nil {
		t.Fatal("a client certificate from another CA was accepted")
	}

	// Renewal: a refresh with a request for the agent's key returns a new
	// certificate for the same address.
	var saved struct {
		RefreshToken string `json:"refresh_token"`
	}
	data, err := os.ReadFile(filepath.Join(a.dir, "host.json"))
	if err != nil || json.Unmarshal(data, &saved) != nil {
		t.Fatalf("host.json: %v", err)
	}
	agentKey, err := tls.LoadX509KeyPair(filepath.Join(a.dir, "agent-tls.crt"), filepath.Join(a.dir, "agent-tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, agentKey.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	var renewed struct {
		Certificate string `json:"certificate"`
		CACert      string `json:"ca_certificate"`
	}
	c.want(c.do("POST", "/v1/hosts/auth/refresh", creds{}, map[string]string{"refresh_token": saved.RefreshToken,
		"csr": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER}))}), 200).json(t, &renewed)
	block, _ := pem.Decode([]byte(renewed.Certificate))
	if block == nil || renewed.CACert != string(ca.CertPEM()) {
		t.Fatalf("refresh answer without a certificate: %+v", renewed)
	}
	next, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := next.Verify(x509.VerifyOptions{Roots: roots, DNSName: "127.0.0.1"}); err != nil || next.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Fatalf("renewed certificate: %v (serial %v)", err, next.SerialNumber)
	}
}

// A certificate request to a control plane without the CA is refused
// before the registration token is spent.
func TestRegisterWithCSRNeedsTheCA(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	_, token := c.newHostToken(admin)
	body := map[string]any{"token": token, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}
	for k, v := range specs {
		body[k] = v
	}
	r := c.want(c.do("POST", "/v1/hosts/register", creds{}, body), 400)
	if !strings.Contains(string(r.body), "WRENN_AGENT_CA_DIR") {
		t.Fatalf("error does not name the setting: %s", r.body)
	}
	delete(body, "csr")
	c.want(c.do("POST", "/v1/hosts/register", creds{}, body), 201)
}
