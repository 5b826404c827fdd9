package e2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

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
	if _, err := os.Stat("e2bsdk/node_modules/e2b"); err != nil {
		if os.Getenv("WRENN_REQUIRE_BROWSER") == "1" || os.Getenv("WRENN_REQUIRE_E2B_SDK") == "1" {
			t.Fatal("e2e/e2bsdk/node_modules is missing (make web-deps)")
		}
		t.Skip("e2e/e2bsdk/node_modules is missing: run make web-deps")
	}
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	user, _ := wrenn.New(s.url, wrenn.WithToken(s.token))
	key, err := user.CreateAPIKey(ctx, "e2b sdk", wrenn.KeyFormatE2B)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(key.Key, "e2b_") || len(key.Key) != 44 {
		t.Fatalf("an E2B-format key looks like %q", key.Key)
	}
	other := otherTeamKey(ctx, t, s)

	cmd := exec.CommandContext(ctx, "node", "journey.mjs")
	cmd.Dir = "e2bsdk"
	cmd.Env = append(os.Environ(), "E2B_API_URL="+s.url, "E2B_SANDBOX_URL="+s.url, "E2B_API_KEY="+key.Key,
		"E2B_DOMAIN=", "E2B_DEBUG=", "CP_ADDR="+strings.TrimPrefix(s.url, "http://"), "OTHER_API_KEY="+other)
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("the e2b SDK journey failed: %v", err)
	}
	// The same capsules were capsules to the Wrenn API all along.
	sbs, err := s.client().ListCapsules(ctx, wrenn.ListCapsulesParams{Statuses: []string{"stopped"}, Metadata: map[string]string{"suite": "e2b-sdk"}})
	if err != nil || len(sbs) != 1 || sbs[0].Template == "" {
		t.Fatalf("the SDK's sandbox through /v1: %+v %v", sbs, err)
	}
	s.nothingLeft()
}
