package e2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/testcerts"
	"github.com/wrenn/wrenn/pkg/wrenn"
)

// The official e2b npm package, unchanged, drives Wrenn with only its
// own settings pointed here: E2B_API_URL and E2B_SANDBOX_URL at the
// control plane, E2B_API_KEY a Wrenn API key in E2B's format. It creates
// sandboxes with metadata, environment and a timeout; runs commands
// (output, exit codes, CommandExitError, streaming, background, stdin,
// kill); moves files (text, 10 MiB binary, list, exists, rename,
// remove, watch, a signed URL); opens a terminal; reaches a server in
// the sandbox through getHost, public and with a traffic token; lists,
// reads and re-times sandboxes; pauses and connects; is refused with a
// bad key and finds nothing with another team's; kills.
func TestOfficialE2BSDK(t *testing.T) {
	needE2BSDK(t)
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	key := e2bKey(ctx, t, s)
	other := otherTeamKey(ctx, t, s)

	cmd := exec.CommandContext(ctx, "node", "journey.mjs")
	cmd.Dir = "e2bsdk"
	cmd.Env = append(os.Environ(), "E2B_API_URL="+s.url, "E2B_SANDBOX_URL="+s.url, "E2B_API_KEY="+key,
		"E2B_DOMAIN=", "E2B_DEBUG=", "CP_ADDR="+strings.TrimPrefix(s.url, "http://"), "OTHER_API_KEY="+other)
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("the e2b SDK journey failed: %v", err)
	}
	// The same capsules were capsules to the Wrenn API all along: the
	// journey's sandbox and its fork (which has its metadata).
	sbs, err := s.client().ListCapsules(ctx, wrenn.ListCapsulesParams{Statuses: []string{"stopped"}, Metadata: map[string]string{"suite": "e2b-sdk"}})
	forks := 0
	for _, sb := range sbs {
		if sb.StartedFrom == "fork" {
			forks++
		}
	}
	if err != nil || len(sbs) != 2 || forks != 1 || sbs[0].Template == "" {
		t.Fatalf("the SDK's sandboxes through /v1: %+v %v", sbs, err)
	}
	s.nothingLeft()
}

// The same SDK given nothing but E2B_DOMAIN and E2B_API_KEY, against the
// TLS ingress: it finds the API at https://api.<domain> and envd and the
// sandbox's ports at https://<port>-<id>.<domain>. The domain carries the
// listener's port (a test cannot take 443); the names resolve to
// 127.0.0.1 as a wildcard DNS record would send them to the ingress.
func TestOfficialE2BSDKWithOnlyADomain(t *testing.T) {
	needE2BSDK(t)
	dir := t.TempDir()
	ca := testcerts.Issue(t, dir, "ca", testcerts.CA, nil)
	cert := testcerts.Issue(t, dir, "*.sandboxes.test", testcerts.Server, ca)
	port := freeport.Get(t)
	domain := "sandboxes.test:" + port
	s := startStack(t, "WRENN_INGRESS_LISTEN_ADDR=127.0.0.1:"+port, "WRENN_INGRESS_DOMAIN="+domain,
		"WRENN_INGRESS_TLS_CERT="+cert.CertFile, "WRENN_INGRESS_TLS_KEY="+cert.KeyFile)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	key := e2bKey(ctx, t, s)

	cmd := exec.CommandContext(ctx, "node", "--require", "./resolve.cjs", "domain.mjs")
	cmd.Dir = "e2bsdk"
	cmd.Env = append(os.Environ(), "E2B_DOMAIN="+domain, "E2B_API_KEY="+key, "E2B_API_URL=", "E2B_SANDBOX_URL=", "E2B_DEBUG=",
		"NODE_EXTRA_CA_CERTS="+ca.CertFile, "WILDCARD_DOMAIN=sandboxes.test")
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("the e2b SDK with only E2B_DOMAIN failed: %v", err)
	}
	s.nothingLeft()
}

// needE2BSDK skips (or, when the suite must run everything, fails)
// without the npm package.
func needE2BSDK(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("e2bsdk/node_modules/e2b"); err != nil {
		if os.Getenv("WRENN_REQUIRE_BROWSER") == "1" || os.Getenv("WRENN_REQUIRE_E2B_SDK") == "1" {
			t.Fatal("e2e/e2bsdk/node_modules is missing (make web-deps)")
		}
		t.Skip("e2e/e2bsdk/node_modules is missing: run make web-deps")
	}
}

// e2bKey is a new API key of the stack's team in E2B's format.
func e2bKey(ctx context.Context, t *testing.T, s *stack) string {
	t.Helper()
	user, _ := wrenn.New(s.url, wrenn.WithToken(s.token))
	key, err := user.CreateAPIKey(ctx, "e2b sdk", wrenn.KeyFormatE2B)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(key.Key, "e2b_") || len(key.Key) != 44 {
		t.Fatalf("an E2B-format key looks like %q", key.Key)
	}
	return key.Key
}
