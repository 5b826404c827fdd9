package e2e

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// A snapshot of a running capsule through the API keeps its memory: a
// capsule made from it starts from that memory, with the processes the
// original ran, and is itself; one of another shape boots and says why; a
// paused capsule can be snapshotted too.
func TestSnapshotsKeepMemory(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	sh := func(id, script string) string { t.Helper(); return mustSh(ctx, t, c, id, script) }
	src, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	if src.StartedFrom != "boot" {
		t.Fatalf("a capsule of minimal started from %q", src.StartedFrom)
	}
	keeper := sh(src.ID, `nohup sh -c 'echo $$ > /tmp/keeper.pid; exec sleep 100000' >/dev/null 2>&1 & sleep 0.5; cat /tmp/keeper.pid`)
	tpl, err := c.CreateSnapshot(ctx, src.ID, "warm")
	if err != nil {
		t.Fatal(err)
	}
	if !tpl.HasMemory || tpl.MemoryBytes == 0 || tpl.MemoryMB == nil || *tpl.MemoryMB != 256 {
		t.Fatalf("the snapshot: %+v", tpl)
	}

	start := time.Now()
	clone, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "warm", Envs: map[string]string{"WHO": "clone"}, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("capsule from the snapshot's memory in %v", time.Since(start).Round(time.Millisecond))
	if clone.StartedFrom != "memory" || clone.MemoryMB != 256 {
		t.Fatalf("the capsule from the snapshot: started from %q (%s), %d MB", clone.StartedFrom, clone.BootNote, clone.MemoryMB)
	}
	if out := sh(clone.ID, `kill -0 "$(cat /tmp/keeper.pid)" && cat /tmp/keeper.pid; hostname; echo "$WHO $WRENN_SANDBOX_ID"`); out != keeper+"\n"+clone.ID+"\nclone "+clone.ID {
		t.Fatalf("in the clone:\n%s", out)
	}

	other, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "warm", MemoryMB: 384, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	if other.StartedFrom != "boot" || !strings.Contains(other.BootNote, "256 MiB") {
		t.Fatalf("a 384 MB capsule from the snapshot: %q %q", other.StartedFrom, other.BootNote)
	}

	if _, err := c.PauseCapsule(ctx, clone.ID); err != nil {
		t.Fatal(err)
	}
	paused, err := c.CreateSnapshot(ctx, clone.ID, "from-paused")
	if err != nil {
		t.Fatalf("a snapshot of a paused capsule: %v", err)
	}
	if !paused.HasMemory {
		t.Fatalf("the paused capsule's snapshot has no memory: %+v", paused)
	}
	again, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "from-paused", Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	if again.StartedFrom != "memory" || sh(again.ID, `kill -0 "$(cat /tmp/keeper.pid)" && hostname`) != again.ID {
		t.Fatalf("from the paused capsule's snapshot: %q", again.StartedFrom)
	}

	for _, id := range []string{src.ID, clone.ID, other.ID, again.ID} {
		if _, err := c.DestroyCapsule(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"warm", "from-paused"} {
		if err := c.DeleteTemplate(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	s.nothingLeft()
}

// A fork through the API and the CLI: the new capsules have the running
// capsule's processes and files as they were, their own ids, tokens and
// host names, and count against the team like any capsule.
func TestForkThroughTheAPI(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	sh := func(id, script string) string { t.Helper(); return mustSh(ctx, t, c, id, script) }
	src, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Metadata: map[string]string{"job": "fork"}, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	keeper := sh(src.ID, `echo state > /tmp/state; nohup sh -c 'echo $$ > /tmp/keeper.pid; exec sleep 100000' >/dev/null 2>&1 & sleep 0.5; cat /tmp/keeper.pid`)
	start := time.Now()
	kids, err := c.ForkCapsule(ctx, src.ID, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fork into 2 through the API in %v", time.Since(start).Round(time.Millisecond))
	if len(kids) != 2 || kids[0].ID == kids[1].ID || kids[0].EnvdAccessToken == "" || kids[0].EnvdAccessToken == kids[1].EnvdAccessToken {
		t.Fatalf("the fork: %+v", kids)
	}
	for _, k := range kids {
		if k.Status != "running" || k.StartedFrom != "fork" || k.MemoryMB != 256 || k.Metadata["job"] != "fork" || k.Template != src.Template {
			t.Fatalf("a forked capsule: %+v", k)
		}
		if out := sh(k.ID, `kill -0 "$(cat /tmp/keeper.pid)" && cat /tmp/keeper.pid /tmp/state; hostname`); out != keeper+"\nstate\n"+k.ID {
			t.Fatalf("in %s:\n%s", k.ID, out)
		}
	}
	// The CLI, and what a bad request gets.
	cl := &cli{t: t, bin: filepath.Join(s.bin, "wrenn"), config: filepath.Join(t.TempDir(), "config.json"), env: []string{"WRENN_URL=" + s.url, "WRENN_API_KEY=" + s.key}}
	var made []struct {
		ID          string `json:"id"`
		StartedFrom string `json:"started_from"`
	}
	if err := json.Unmarshal([]byte(cl.ok("sandbox", "fork", src.ID, "--json")), &made); err != nil || len(made) != 1 || made[0].StartedFrom != "fork" {
		t.Fatalf("wrenn sandbox fork: %+v %v", made, err)
	}
	if _, errOut, code := cl.run("", "sandbox", "fork", src.ID, "-n", "99"); code != 1 || !strings.Contains(errOut, "between 1 and 16") {
		t.Fatalf("a fork of 99: %d %q", code, errOut)
	}
	if _, err := c.PauseCapsule(ctx, src.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ForkCapsule(ctx, src.ID, 1); err == nil || !strings.Contains(err.Error(), "paused") {
		t.Fatalf("a fork of a paused capsule: %v", err)
	}
	for _, id := range []string{src.ID, kids[0].ID, kids[1].ID, made[0].ID} {
		if _, err := c.DestroyCapsule(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	s.nothingLeft()
}

// mustSh runs a shell script in a capsule and returns its trimmed stdout;
// anything but exit 0 fails the test.
func mustSh(ctx context.Context, t *testing.T, c *wrenn.Client, id, script string) string {
	t.Helper()
	res, err := c.Exec(ctx, id, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", script}})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%s in %s: %+v %v", script, id, res, err)
	}
	return strings.TrimSpace(string(res.Stdout))
}
