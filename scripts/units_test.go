package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnits renders the units as prepare-wrenn-user.sh installs them
// and has systemd check them: any warning (an unknown key, a bad value, a
// missing binary) fails.
func TestSystemdUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("WRENN_REQUIRE_IMAGES") == "1" {
			t.Fatal("systemd-analyze missing (scripts/install-deps.sh installs systemd)")
		}
		t.Skip("systemd-analyze missing")
	}
	root, _ := filepath.Abs("..")
	bin := t.TempDir()
	for _, name := range []string{"wrenn-agent", "wrenn-cp"} {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	env := filepath.Join(out, "cp.env")
	_ = os.WriteFile(env, nil, 0o600)
	var units []string
	for _, name := range []string{"wrenn-agent.service", "wrenn-cp.service"} {
		data, err := os.ReadFile(filepath.Join(root, "deploy", "systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		text := strings.NewReplacer("@BIN@", bin, "@USER@", "wrenn", "@DIR@", "/var/lib/wrenn", "@DOC@", filepath.Join(root, "docs", "security.md"),
			"/etc/wrenn/cp.env", env).Replace(string(data))
		if strings.Contains(text, "@") {
			t.Fatalf("%s has a placeholder prepare-wrenn-user.sh does not fill", name)
		}
		path := filepath.Join(out, name)
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		units = append(units, path)
	}
	res, err := exec.Command(analyze, append([]string{"verify"}, units...)...).CombinedOutput()
	if err != nil || strings.TrimSpace(string(res)) != "" {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, res)
	}
	// The script fills the same placeholders.
	script, err := os.ReadFile(filepath.Join(root, "scripts", "prepare-wrenn-user.sh"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"@BIN@", "@USER@", "@DIR@", "@DOC@"} {
		if !strings.Contains(string(script), "s|"+p+"|") {
			t.Errorf("prepare-wrenn-user.sh does not fill %s", p)
		}
	}
}
