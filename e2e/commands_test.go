package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// Commands behave as a developer expects: a timeout kills the command
// and what it started and says so (with the output so far); a caller
// that gives up (a cancelled context, Ctrl-C, a closed stream) stops the
// command; stdin reaches it; a missing command exits 127 with the
// shell's message; the CLI prints JSON when asked, refuses unknown
// subcommands with a suggestion, and prefixes errors once.
func TestCommandSemantics(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	running := func(marker string) bool {
		t.Helper()
		// "[s]leep ..." matches the command but not this shell's own command line.
		pattern := "'[" + marker[:1] + "]" + marker[1:] + "'"
		res, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "pgrep -f " + pattern + " || true"}})
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(res.Stdout)) != ""
	}
	gone := func(marker string) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for running(marker) {
			if time.Now().After(deadline) {
				t.Fatalf("processes matching %s still run", marker)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}

	// A timeout: 502 agent_error as upstream Wrenn answers it (its SDK maps
	// that code), saying it timed out, with timed_out and the output so far;
	// the command and the process it started in the background are gone.
	body, _ := json.Marshal(map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo before; sleep 301 & sleep 302"}, "timeout_sec": 2})
	req, _ := http.NewRequest(http.MethodPost, s.url+"/v1/capsules/"+sb.ID+"/exec", bytes.NewReader(body))
	req.Header.Set("X-API-Key", s.key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var answer struct {
		Error struct {
			Code, Message, Stdout string
			TimedOut              bool `json:"timed_out"`
		}
	}
	_ = json.NewDecoder(res.Body).Decode(&answer)
	res.Body.Close()
	if res.StatusCode != http.StatusBadGateway || answer.Error.Code != "agent_error" || !answer.Error.TimedOut || answer.Error.Stdout != "before\n" ||
		!strings.HasPrefix(answer.Error.Message, "timed out: ") {
		t.Fatalf("a timed-out exec: %d %+v", res.StatusCode, answer)
	}
	gone("sleep 30[12]")
	if _, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "sleep", Args: []string{"5"}, TimeoutSec: 1}); !errors.Is(err, wrenn.ErrTimedOut) {
		t.Fatalf("the SDK's timeout error: %v", err)
	}

	// A caller that gives up stops its command: the SDK's context.
	cctx, ccancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := c.ExecStream(cctx, sb.ID, wrenn.ExecParams{Cmd: "sleep", Args: []string{"303"}}, nil)
		done <- err
	}()
	deadline := time.Now().Add(15 * time.Second)
	for !running("sleep 303") {
		if time.Now().After(deadline) {
			t.Fatal("the streamed command never started")
		}
		time.Sleep(200 * time.Millisecond)
	}
	ccancel()
	<-done
	gone("sleep 303")

	// Stdin through the SDK's stream, and through the unary call.
	var out bytes.Buffer
	code, err := c.ExecStream(ctx, sb.ID, wrenn.ExecParams{Cmd: "sh", Args: []string{"-c", "tr a-z A-Z; echo done"}, Stdin: strings.NewReader("streamed stdin\n")},
		func(_ string, d []byte) { out.Write(d) })
	if err != nil || code != 0 || out.String() != "STREAMED STDIN\ndone\n" {
		t.Fatalf("stream with stdin: %d %v %q", code, err, out.String())
	}
	r, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "wc", Args: []string{"-c"}, Stdin: bytes.NewReader(make([]byte, 100000))})
	if err != nil || strings.TrimSpace(string(r.Stdout)) != "100000" {
		t.Fatalf("exec with stdin: %q %v", r.Stdout, err)
	}

	// A missing command: 127 and the shell's words.
	r, err = c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "no-such-command-here"})
	if err != nil || r.ExitCode != 127 || string(r.Stderr) != "no-such-command-here: command not found\n" {
		t.Fatalf("missing command: %+v %v", r, err)
	}

	// The CLI.
	cl := &cli{t: t, bin: filepath.Join(s.bin, "wrenn"), config: filepath.Join(t.TempDir(), "config.json"), env: []string{"WRENN_URL=" + s.url, "WRENN_API_KEY=" + s.key}}
	if out, _, code := cl.run("piped through\n", "exec", "-i", sb.ID, "--", "cat"); code != 0 || out != "piped through\n" {
		t.Fatalf("wrenn exec -i: %d %q", code, out)
	}
	if _, errOut, code := cl.run("", "exec", sb.ID, "--", "no-such-command-here"); code != 127 || !strings.Contains(errOut, "command not found") {
		t.Fatalf("wrenn exec of a missing command: %d %q", code, errOut)
	}
	var js struct {
		ExitCode int    `json:"exit_code"`
		Stdout   string `json:"stdout"`
		Stderr   string `json:"stderr"`
	}
	outJSON, _, code := cl.run("", "exec", "--json", sb.ID, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
	if err := json.Unmarshal([]byte(outJSON), &js); err != nil || code != 3 || js.ExitCode != 3 || js.Stdout != "out\n" || js.Stderr != "err\n" {
		t.Fatalf("wrenn exec --json: %d %q %v", code, outJSON, err)
	}
	if _, errOut, code := cl.run("", "exec", "--timeout", "1s", sb.ID, "--", "sleep", "304"); code != 124 || !strings.Contains(errOut, "ran longer than 1s") {
		t.Fatalf("wrenn exec --timeout: %d %q", code, errOut)
	}
	gone("sleep 304")
	if _, errOut, code := cl.run("", "sandbox", "lsit"); code != 1 || !strings.Contains(errOut, "did you mean list?") {
		t.Fatalf("an unknown subcommand: %d %q", code, errOut)
	}
	if _, errOut, code := cl.run("", "exec", "sb-nosuchcapsule", "--", "true"); code != 1 || !strings.HasPrefix(errOut, "wrenn: ") || strings.Contains(errOut, "wrenn: wrenn:") {
		t.Fatalf("an error's prefix: %d %q", code, errOut)
	}
	// Ctrl-C stops the remote command too.
	cmd := exec.Command(cl.bin, "exec", sb.ID, "--", "sleep", "305")
	cmd.Env = append(cmd.Environ(), "WRENN_CONFIG="+cl.config, "WRENN_URL="+s.url, "WRENN_API_KEY="+s.key)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(15 * time.Second)
	for !running("sleep 305") {
		if time.Now().After(deadline) {
			t.Fatal("the CLI's command never started")
		}
		time.Sleep(200 * time.Millisecond)
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 130 || !strings.Contains(errb.String(), "interrupted") {
		t.Fatalf("Ctrl-C: %v %q", err, errb.String())
	}
	gone("sleep 305")
	if _, err := c.DestroyCapsule(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
}
