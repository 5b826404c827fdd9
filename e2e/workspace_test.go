package e2e

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// A capsule is big enough to work in: its disk is 5 GiB unless asked
// otherwise (thin: the host holds only what was written), and the base
// template has Python with pip and venv, Node.js, git and a compiler.
func TestCapsulesToWorkIn(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	sh := func(id, script string) string {
		t.Helper()
		res, err := c.Exec(ctx, id, wrenn.ExecParams{Cmd: "/bin/bash", Args: []string{"-lc", script}, TimeoutSec: 120})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("%s: %+v %v\n%s%s", script, res, err, res.Stdout, res.Stderr)
		}
		return strings.TrimSpace(string(res.Stdout))
	}
	rootMB := func(id string) int {
		n, _ := strconv.Atoi(sh(id, "df -BM --output=size / | tail -1 | tr -dc 0-9"))
		return n
	}

	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "base", MemoryMB: 512, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	if sb.DiskSizeMB == nil || *sb.DiskSizeMB != 5120 {
		t.Fatalf("default disk %v, want 5120 MB", sb.DiskSizeMB)
	}
	if mb := rootMB(sb.ID); mb < 4700 {
		t.Fatalf("the guest's root file system has %d MB, want about 5 GiB", mb)
	}
	// What people reach for first.
	out := sh(sb.ID, `python3 -c 'import sys; print(sys.version_info[0])'; node -e 'console.log(6*7)'; git --version | cut -d' ' -f1-2;
		printf '#include <stdio.h>\nint main(){puts("compiled");}\n' > /tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h;
		python3 -m venv /tmp/venv && /tmp/venv/bin/pip --version | cut -d' ' -f1; pip --version | cut -d' ' -f1; npm --version >/dev/null && echo npm; jq -n 1`)
	if out != "3\n42\ngit version\ncompiled\npip\npip\nnpm\n1" {
		t.Fatalf("the base template's tools said:\n%s", out)
	}
	// Room to work: a 1 GiB file fits, and the host holds little more than what was written.
	sh(sb.ID, "head -c 1G /dev/zero > /home/user/big && sync && rm /home/user/big && sync")
	du, err := exec.Command("du", "-sm", filepath.Join(s.agentDir, "sandboxes", sb.ID)).Output()
	if err != nil {
		t.Fatal(err)
	}
	if mb, _ := strconv.Atoi(strings.Fields(string(du))[0]); mb > 1400 {
		t.Fatalf("the capsule's disk takes %d MB on the host: not thin", mb)
	}

	// Asked for: 8 GiB on minimal, through the CLI.
	cl := &cli{t: t, bin: filepath.Join(s.bin, "wrenn"), config: filepath.Join(t.TempDir(), "config.json"), env: []string{"WRENN_URL=" + s.url, "WRENN_API_KEY=" + s.key}}
	var made struct {
		ID         string `json:"id"`
		DiskSizeMB int    `json:"disk_size_mb"`
	}
	if err := json.Unmarshal([]byte(cl.ok("sandbox", "create", "--memory", "256", "--disk", "8G", "--json")), &made); err != nil || made.DiskSizeMB != 8192 {
		t.Fatalf("wrenn sandbox create --disk 8G: %+v %v", made, err)
	}
	id := made.ID
	if mb := rootMB(id); mb < 7500 { // ext4 keeps about 6% for itself
		t.Fatalf("--disk 8G gave a root file system of %d MB", mb)
	}
	if _, errOut, code := cl.run("", "sandbox", "create", "--disk", "2000G"); code != 1 || !strings.Contains(errOut, "maximum") {
		t.Fatalf("a disk over the maximum: %d %q", code, errOut)
	}
	for _, x := range []string{sb.ID, id} {
		if _, err := c.DestroyCapsule(ctx, x); err != nil {
			t.Fatal(err)
		}
	}
	s.nothingLeft()
}
