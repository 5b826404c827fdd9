package e2e

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// The user journey through the public REST API (Go SDK), against the
// real binaries: create, exec, stream, terminal, files, background
// process, pause and resume with memory intact, snapshot, a capsule from
// the snapshot, a timeout that reaps an idle capsule, destroy, and
// nothing left on the host.
func TestJourneyThroughTheAPI(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// An idle capsule with the shortest timeout (60 s) starts first; the
	// reconciler should pause it while the rest of the journey runs.
	idle, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, TimeoutSec: 60, Metadata: map[string]string{"role": "idle"}})
	if err != nil {
		t.Fatal(err)
	}
	idleSince := time.Now()

	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	if sb.Status != "running" {
		t.Fatalf("created: %+v", sb)
	}

	res, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "echo hello from wrenn; echo oops >&2; exit 7"}})
	if err != nil || string(res.Stdout) != "hello from wrenn\n" || string(res.Stderr) != "oops\n" || res.ExitCode != 7 {
		t.Fatalf("exec: %+v %v", res, err)
	}

	var streamed []string
	code, err := c.ExecStream(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "for i in 1 2 3; do echo tick $i; sleep 0.2; done"}},
		func(stream string, data []byte) { streamed = append(streamed, stream+":"+string(data)) })
	if err != nil || code != 0 || strings.Join(streamed, "") != "stdout:tick 1\nstdout:tick 2\nstdout:tick 3\n" {
		t.Fatalf("stream: %q %d %v", streamed, code, err)
	}

	// A terminal: type, see the output, resize, leave with an exit code.
	term, err := c.OpenTerminal(ctx, sb.ID, wrenn.TerminalParams{Cols: 90, Rows: 30})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := term.Write([]byte("stty size; echo term-$((40+2))\n")); err != nil {
		t.Fatal(err)
	}
	screen := readUntil(t, term, "term-42")
	if !strings.Contains(screen, "30 90") {
		t.Fatalf("terminal size not applied: %q", screen)
	}
	_ = term.Resize(100, 40)
	_, _ = term.Write([]byte("stty size\n"))
	readUntil(t, term, "40 100")
	_, _ = term.Write([]byte("exit 9\n"))
	if code := waitExit(t, term); code != 9 {
		t.Fatalf("terminal exit code %d", code)
	}
	term.Close()

	// Files: upload 5 MiB, list, download the same bytes.
	payload := bytes.Repeat([]byte("wrenn-e2e-"), 512*1024)
	if err := c.WriteFile(ctx, sb.ID, "/home/user/data/blob.bin", bytes.NewReader(payload)); err != nil {
		t.Fatal(err)
	}
	entries, err := c.ListDir(ctx, sb.ID, "/home/user/data")
	if err != nil || len(entries) != 1 || entries[0].Name != "blob.bin" || entries[0].Size != int64(len(payload)) {
		t.Fatalf("list: %+v %v", entries, err)
	}
	body, err := c.ReadFile(ctx, sb.ID, "/home/user/data/blob.bin")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(body)
	body.Close()
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("download: %d bytes, %v", len(got), err)
	}
	if _, err := c.ReadFile(ctx, sb.ID, "/nope"); !wrenn.IsNotFound(err) {
		t.Fatalf("missing file: %v", err)
	}

	// A background process and memory survive pause and resume.
	if _, err := c.StartProcess(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done"}}, "counter"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "head -c 20000000 /dev/urandom > /dev/shm/mem && sha256sum /dev/shm/mem > /tmp/mem.sum"}}); err != nil {
		t.Fatal(err)
	}
	if p, err := c.PauseCapsule(ctx, sb.ID); err != nil || p.Status != "paused" {
		t.Fatalf("pause: %+v %v", p, err)
	}
	if _, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "true"}); !wrenn.IsConflict(err) {
		t.Fatalf("exec on a paused capsule: %v", err)
	}
	if r, err := c.ResumeCapsule(ctx, sb.ID); err != nil || r.Status != "running" {
		t.Fatalf("resume: %+v %v", r, err)
	}
	check, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "sha256sum", Args: []string{"-c", "/tmp/mem.sum"}})
	if err != nil || check.ExitCode != 0 {
		t.Fatalf("memory after resume: %s %s %v", check.Stdout, check.Stderr, err)
	}
	procs, err := c.ListProcesses(ctx, sb.ID)
	if err != nil || !hasTag(procs, "counter") {
		t.Fatalf("background process after resume: %+v %v", procs, err)
	}
	first, _ := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "cat", Args: []string{"/tmp/counter"}})
	time.Sleep(time.Second)
	second, _ := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "cat", Args: []string{"/tmp/counter"}})
	if string(first.Stdout) == string(second.Stdout) {
		t.Fatalf("the background process stopped counting after resume (%q)", first.Stdout)
	}
	if err := c.KillProcess(ctx, sb.ID, "counter"); err != nil {
		t.Fatal(err)
	}

	// Snapshot to a template; a capsule from it has the file.
	tpl, err := c.CreateSnapshot(ctx, sb.ID, "journey-snap")
	if err != nil || tpl.Name != "journey-snap" {
		t.Fatalf("snapshot: %+v %v", tpl, err)
	}
	child, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "journey-snap", MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	sum, err := c.Exec(ctx, child.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "sha256sum < /home/user/data/blob.bin"}})
	orig, _ := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "sha256sum < /home/user/data/blob.bin"}})
	if err != nil || sum.ExitCode != 0 || string(sum.Stdout) != string(orig.Stdout) {
		t.Fatalf("file in the capsule from the snapshot: %q vs %q %v", sum.Stdout, orig.Stdout, err)
	}

	// The idle capsule was reaped by its timeout.
	for {
		cur, err := c.GetCapsule(ctx, idle.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.Status == "paused" {
			t.Logf("idle capsule paused %s after creation", time.Since(idleSince).Round(time.Second))
			break
		}
		if time.Since(idleSince) > 3*time.Minute {
			t.Fatalf("the idle capsule is still %s after %s (timeout 60 s)", cur.Status, time.Since(idleSince).Round(time.Second))
		}
		time.Sleep(time.Second)
	}

	// Destroy everything; nothing is left on the host.
	for _, id := range []string{sb.ID, child.ID, idle.ID} {
		if d, err := c.DestroyCapsule(ctx, id); err != nil || d.Status != "stopped" {
			t.Fatalf("destroy %s: %+v %v", id, d, err)
		}
	}
	if err := c.DeleteTemplate(ctx, "journey-snap"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetCapsule(ctx, "sb-doesnotexist0001"); !wrenn.IsNotFound(err) {
		t.Fatalf("missing capsule: %v", err)
	}
	live, err := c.ListCapsules(ctx, wrenn.ListCapsulesParams{})
	if err != nil || len(live) != 0 {
		t.Fatalf("capsules left: %+v %v", live, err)
	}
	s.nothingLeft()
}

func hasTag(ps []wrenn.Process, tag string) bool {
	for _, p := range ps {
		if p.Tag == tag {
			return true
		}
	}
	return false
}

// readUntil collects terminal output until it holds want.
func readUntil(t *testing.T, term *wrenn.Terminal, want string) string {
	t.Helper()
	var out strings.Builder
	for !strings.Contains(out.String(), want) {
		ev, err := term.Next()
		if err != nil {
			t.Fatalf("waiting for %q: %v (so far %q)", want, err, out.String())
		}
		out.Write(ev.Output)
	}
	return out.String()
}

func waitExit(t *testing.T, term *wrenn.Terminal) int {
	t.Helper()
	for {
		ev, err := term.Next()
		if err != nil {
			t.Fatalf("waiting for the terminal to exit: %v", err)
		}
		if ev.Type == "exit" {
			return ev.ExitCode
		}
	}
}
