package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// The dashboard that wrenn-cp embeds, in headless Chromium (Debian's
// chromium driven by playwright-core): log in, create a capsule, run a
// command in its terminal, upload a file, see it listed, tag a host,
// create a team and switch to it and back, destroy the
// capsule. Screenshots of the main pages are kept in
// $WRENN_ARTIFACTS/dashboard (default: the test's temporary directory).
func TestDashboardInChromium(t *testing.T) {
	if _, err := exec.LookPath("chromium"); err != nil {
		if os.Getenv("WRENN_REQUIRE_BROWSER") == "1" {
			t.Fatal("chromium is missing (scripts/install-deps.sh installs it)")
		}
		t.Skip("chromium is missing: scripts/install-deps.sh installs it")
	}
	if _, err := os.Stat("../web/node_modules/playwright-core"); err != nil {
		if os.Getenv("WRENN_REQUIRE_BROWSER") == "1" {
			t.Fatal("web/node_modules is missing (make web-deps)")
		}
		t.Skip("web/node_modules is missing: run make web-deps")
	}
	s := startStack(t)
	shots := filepath.Join(t.TempDir(), "dashboard")
	if dir := os.Getenv("WRENN_ARTIFACTS"); dir != "" {
		shots = filepath.Join(dir, "dashboard")
	}
	cmd := exec.Command("node", "tests/e2e.mjs")
	cmd.Dir = "../web"
	cmd.Env = append(os.Environ(), "WRENN_URL="+s.url, "WRENN_EMAIL="+s.email, "WRENN_PASSWORD="+s.password, "SCREENSHOTS="+shots)
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("dashboard journey failed: %v (screenshots in %s)", err, shots)
	}
	for _, page := range []string{"login", "capsules", "capsule-terminal", "capsule-files", "capsule-ports", "templates", "keys", "usage", "audit", "hosts", "hosts-tagged", "team-switched"} {
		if st, err := os.Stat(filepath.Join(shots, page+".png")); err != nil || st.Size() < 2000 {
			t.Errorf("screenshot of %s missing or empty: %v", page, err)
		}
	}
	s.nothingLeft()
}
