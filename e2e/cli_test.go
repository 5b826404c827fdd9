package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// cli runs the wrenn binary with its own config file.
type cli struct {
	t      *testing.T
	bin    string
	config string
	env    []string
}

// run returns stdout, stderr and the exit code.
func (c *cli) run(stdin string, args ...string) (string, string, int) {
	c.t.Helper()
	cmd := exec.Command(c.bin, args...)
	cmd.Env = append(append(os.Environ(), "WRENN_CONFIG="+c.config, "WRENN_API_KEY=", "WRENN_URL="), c.env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			c.t.Fatalf("wrenn %v: %v", args, err)
		}
	case <-time.After(3 * time.Minute):
		_ = cmd.Process.Kill()
		c.t.Fatalf("wrenn %v did not finish: %s %s", args, out.String(), errb.String())
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// ok runs a command that must succeed and returns its stdout.
func (c *cli) ok(args ...string) string {
	c.t.Helper()
	out, errOut, code := c.run("", args...)
	if code != 0 {
		c.t.Fatalf("wrenn %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// The same journey through the wrenn CLI binary.
func TestJourneyThroughTheCLI(t *testing.T) {
	s := startStack(t)
	c := &cli{t: t, bin: filepath.Join(s.bin, "wrenn"), config: filepath.Join(t.TempDir(), "config.json"), env: []string{"WRENN_PASSWORD=" + s.password}}

	// Without configuration: a clear error.
	if _, errOut, code := c.run("", "sandbox", "list"); code != 1 || !strings.Contains(errOut, "wrenn login") {
		t.Fatalf("unconfigured: %d %q", code, errOut)
	}
	c.ok("login", s.url, "--email", s.email)
	if st, err := os.Stat(c.config); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("config file: %v %v", st, err)
	}

	var sb struct{ ID, Status string }
	if err := json.Unmarshal([]byte(c.ok("sandbox", "create", "--memory", "256", "-m", "owner=cli", "--json")), &sb); err != nil || sb.Status != "running" {
		t.Fatalf("create: %+v %v", sb, err)
	}
	if out := c.ok("sandbox", "list", "-m", "owner=cli"); !strings.Contains(out, sb.ID) || !strings.Contains(out, "running") {
		t.Fatalf("list table:\n%s", out)
	}

	// exec streams output and returns the command's exit code.
	out, errOut, code := c.run("", "exec", sb.ID, "--", "/bin/sh", "-c", "echo to-out; echo to-err >&2; exit 3")
	if out != "to-out\n" || errOut != "to-err\n" || code != 3 {
		t.Fatalf("exec: %q %q %d", out, errOut, code)
	}
	if _, errOut, code := c.run("", "exec", sb.ID, "ls"); code != 1 || !strings.Contains(errOut, "--") {
		t.Fatalf("exec without --: %d %q", code, errOut)
	}

	// shell: a terminal fed from a pipe; its exit code comes back.
	out, _, code = c.run("echo from-the-shell-$((2*21))\nexit 4\n", "shell", sb.ID)
	if code != 4 || !strings.Contains(out, "from-the-shell-42") {
		t.Fatalf("shell: %d %q", code, out)
	}

	// shell on a real terminal: raw keys, its size, a resize, Ctrl-] to
	// leave the session running, --join to come back, and the exit code.
	term := c.startOnPTY(120, 40, "shell", sb.ID)
	tag := regexp.MustCompile(`--join ([A-Za-z0-9-]+)`).FindStringSubmatch(term.expect("--join "))
	if tag == nil {
		t.Fatal("the shell did not name its session")
	}
	term.expect("root@") // the remote prompt: the CLI is in raw mode by now
	term.keys("stty size; echo typed-$((6*7))\r")
	term.expect("40 120")
	term.expect("typed-42")
	if !strings.Contains(term.expect("typed-42"), "echo typed-") {
		t.Fatal("keystrokes were not echoed by the remote terminal")
	}
	setSize(t, term.master, 100, 30) // the kernel sends the CLI SIGWINCH
	for try := 0; ; try++ {          // the resize travels to the guest while we ask
		term.keys("stty size\r")
		if _, ok := term.shows("30 100", time.Second); ok {
			break
		}
		if try == 20 {
			t.Fatalf("the remote terminal never took the new size:\n%s", term.expect("30 100"))
		}
	}
	term.keys("cd /tmp && export KEPT=yes\r\x1d")
	term.expect("[left session " + tag[1] + " running]")
	if code := term.wait(); code != 0 {
		t.Fatalf("leaving with Ctrl-]: exit %d", code)
	}
	if !term.cooked() {
		t.Fatal("the CLI left the terminal in raw mode")
	}
	again := c.startOnPTY(90, 20, "shell", sb.ID, "--join", tag[1])
	again.expect("--join " + tag[1])
	time.Sleep(300 * time.Millisecond) // a rejoined session shows no new prompt
	again.keys("echo back-in-$(pwd)-$KEPT\r")
	again.expect("back-in-/tmp-yes")
	again.keys("exit 3\r")
	if code := again.wait(); code != 3 {
		t.Fatalf("exit code through the terminal: %d", code)
	}

	// files put, ls, get, mkdir, rm.
	local := filepath.Join(t.TempDir(), "notes.txt")
	if err := os.WriteFile(local, []byte("carried by the cli\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.ok("files", "mkdir", sb.ID, "/home/user/box")
	c.ok("files", "put", sb.ID, local, "/home/user/box/notes.txt")
	if ls := c.ok("files", "ls", sb.ID, "/home/user/box"); !strings.Contains(ls, "notes.txt") {
		t.Fatalf("ls:\n%s", ls)
	}
	if got := c.ok("files", "get", sb.ID, "/home/user/box/notes.txt"); got != "carried by the cli\n" {
		t.Fatalf("get: %q", got)
	}
	back := filepath.Join(t.TempDir(), "back.txt")
	c.ok("files", "get", sb.ID, "/home/user/box/notes.txt", back)
	if data, _ := os.ReadFile(back); string(data) != "carried by the cli\n" {
		t.Fatalf("get to a file: %q", data)
	}

	// pause, resume, timeout, snapshot, a capsule from it, templates.
	c.ok("sandbox", "pause", sb.ID)
	c.ok("sandbox", "resume", sb.ID)
	if out := c.ok("sandbox", "timeout", sb.ID, "10m"); !strings.Contains(out, "10m0s") {
		t.Fatalf("timeout:\n%s", out)
	}
	c.ok("snapshot", "create", sb.ID, "--name", "cli-snap")
	if out := c.ok("template", "list"); !strings.Contains(out, "cli-snap") || !strings.Contains(out, "minimal") {
		t.Fatalf("template list:\n%s", out)
	}
	var child struct{ ID string }
	if err := json.Unmarshal([]byte(c.ok("sandbox", "create", "-t", "cli-snap", "--memory", "256", "--json")), &child); err != nil {
		t.Fatal(err)
	}
	if out := c.ok("exec", child.ID, "--", "cat", "/home/user/box/notes.txt"); out != "carried by the cli\n" {
		t.Fatalf("capsule from the snapshot: %q", out)
	}

	// A template build from a recipe file, its log followed to the end.
	recipe := filepath.Join(t.TempDir(), "recipe.json")
	// With a health check it ends as a memory template: what the build
	// started runs in every capsule made from it.
	if err := os.WriteFile(recipe, []byte(`{"name": "cli-built", "memory_mb": 256, "commands": ["echo building-$((1+1))", "echo v2 > /opt/built",
		"nohup sh -c 'echo $$ > /opt/keeper.pid; exec sleep 100000' >/dev/null 2>&1 & sleep 0.5"],
		"healthcheck": {"cmd": "test -s /opt/built && kill -0 $(cat /opt/keeper.pid)"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := c.ok("template", "build", "-f", recipe); !strings.Contains(out, "building-2") || !strings.Contains(out, `template "cli-built" is ready`) {
		t.Fatalf("template build:\n%s", out)
	}
	var built struct {
		ID          string `json:"id"`
		StartedFrom string `json:"started_from"`
	}
	if err := json.Unmarshal([]byte(c.ok("sandbox", "create", "-t", "cli-built", "--memory", "256", "--json")), &built); err != nil {
		t.Fatal(err)
	}
	if out := c.ok("exec", built.ID, "--", "sh", "-c", "cat /opt/built && test -d /proc/$(cat /opt/keeper.pid) && echo running"); out != "v2\nrunning\n" {
		t.Fatalf("capsule from the built template: %q", out)
	}
	if out := c.ok("sandbox", "get", built.ID); !strings.Contains(out, "memory") {
		t.Fatalf("a capsule of the built template's shape did not start from its memory:\n%s", out)
	}
	c.ok("sandbox", "kill", built.ID)
	c.ok("template", "delete", "cli-built")
	broken := filepath.Join(t.TempDir(), "broken.json")
	_ = os.WriteFile(broken, []byte(`{"name": "x", "commands": []}`), 0o644)
	if _, errOut, code := c.run("", "template", "build", "-f", broken); code != 1 || !strings.Contains(errOut, "commands") {
		t.Fatalf("bad recipe: %d %q", code, errOut)
	}

	// Hosts and keys (the saved sign-in).
	if out := c.ok("host", "list"); !strings.Contains(out, "online") {
		t.Fatalf("host list:\n%s", out)
	}
	if out := c.ok("host", "token"); !strings.Contains(out, "WRENN_REGISTRATION_TOKEN=wrt_") {
		t.Fatalf("host token:\n%s", out)
	}
	var key struct{ ID, Key string }
	if err := json.Unmarshal([]byte(c.ok("key", "create", "ci", "--json")), &key); err != nil || !strings.HasPrefix(key.Key, "wrn_") {
		t.Fatalf("key create: %+v %v", key, err)
	}
	if out := c.ok("key", "list"); !strings.Contains(out, key.ID) || !strings.Contains(out, "wrenn-cli") {
		t.Fatalf("key list:\n%s", out)
	}
	c.ok("key", "revoke", key.ID)
	if _, errOut, code := c.run("", "sandbox", "list", "--api-key", key.Key); code != 1 || !strings.Contains(errOut, "invalid") && !strings.Contains(errOut, "key") {
		t.Fatalf("revoked key: %d %q", code, errOut)
	}

	// Errors a user would make.
	if _, errOut, code := c.run("", "sandbox", "get", "sb-doesnotexist0001"); code != 1 || !strings.Contains(errOut, "not found") {
		t.Fatalf("missing capsule: %d %q", code, errOut)
	}
	if _, errOut, code := c.run("", "sandbox", "timeout", sb.ID, "soon"); code != 1 || !strings.Contains(errOut, "duration") {
		t.Fatalf("bad duration: %d %q", code, errOut)
	}

	for _, id := range []string{sb.ID, child.ID} {
		c.ok("sandbox", "kill", id)
	}
	c.ok("template", "delete", "cli-snap")
	if out := c.ok("sandbox", "list", "--json"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("capsules left: %s", out)
	}
	if out := c.ok("completion", "bash"); !strings.Contains(out, "wrenn") {
		t.Fatal("no bash completion")
	}
	s.nothingLeft()
}
