package builder

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/buildarchive"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/recipe"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// PreBuild and PostBuild are the platform's phases around an
// upstream-form recipe, as upstream Wrenn's: fresh package lists, then the
// recipe as wrenn-user in its home; afterwards, as root, caches and the
// build's files removed. The package list update may fail on a host with
// no way to the mirrors: the build goes on, and a recipe that installs
// packages fails at its own step, saying why.
func PreBuild() []string {
	return []string{
		"RUN --timeout=5m apt-get update -q || echo 'apt-get update failed: going on with the package lists the image has' >&2",
		"USER wrenn-user",
		"WORKDIR /home/wrenn-user",
	}
}

// PostBuild: see PreBuild.
func PostBuild() []string {
	return []string{
		"RUN apt-get clean",
		"RUN apt-get autoremove -y",
		"RUN rm -rf /var/lib/apt/lists/*",
		"RUN rm -rf " + archiveDir + " " + archiveDir + ".tar",
	}
}

// archiveDir is where a build's archive is unpacked; COPY reads from it.
const archiveDir = "/tmp/build-files"

// maxStepOutput is how much of each stream a step's log entry keeps (the
// end, where errors are).
const maxStepOutput = 16 << 10

// StepLog is one step's entry in a build's log, in upstream's shape.
type StepLog struct {
	Step      int    `json:"step"`
	Phase     string `json:"phase"`
	Cmd       string `json:"cmd"`
	Stdout    string `json:"stdout"`
	Stderr    string `json:"stderr"`
	Exit      int32  `json:"exit"`
	Ok        bool   `json:"ok"`
	ElapsedMs int64  `json:"elapsed_ms"`
}

// session is a build capsule and the state its steps carry forward.
type session struct {
	c         agentclient.Client
	sandboxID string
	// env holds what the recipe set; base is the capsule's own
	// environment, for $NAME in ENV values.
	env, base map[string]string
	user      string
	workdir   string
	timeout   time.Duration
	logf      func(string, ...any)
	// record keeps the entries and reports progress.
	entries []StepLog
	record  func(current int, entries []StepLog)
}

// runPhase runs steps, numbering them after those already run; it stops
// at the first that fails.
func (s *session) runPhase(ctx context.Context, phase string, steps []recipe.Step) error {
	if len(steps) > 0 {
		s.logf("\n== %s\n", phase)
	}
	for _, st := range steps {
		n := len(s.entries) + 1
		s.record(n, s.entries)
		s.logf("\n$ %s\n", st.Line)
		start := time.Now()
		e := StepLog{Step: n, Phase: phase, Cmd: st.Line}
		err := s.step(ctx, st, &e)
		e.ElapsedMs = time.Since(start).Milliseconds()
		if err != nil && e.Stderr == "" {
			e.Stderr = err.Error()
		}
		e.Ok = err == nil
		s.entries = append(s.entries, e)
		s.record(n, s.entries)
		if err != nil {
			if cause := context.Cause(ctx); cause != nil {
				return cause
			}
			return fmt.Errorf("%s step %d (%s): %w", phase, n, st.Line, err)
		}
	}
	return nil
}

func (s *session) step(ctx context.Context, st recipe.Step, e *StepLog) error {
	switch st.Kind {
	case recipe.Run:
		timeout := s.timeout
		if st.Timeout > 0 {
			timeout = st.Timeout
		}
		return s.stream(ctx, st.Shell, timeout, e)
	case recipe.Start:
		_, err := s.c.StartProcess(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: s.sandboxID, Cmd: "/bin/sh", Args: []string{"-c", st.Shell},
			Env: s.env, Cwd: s.workdir, User: s.user, Tag: "build-start-" + strings.ToLower(ids.Random(8))}))
		return err
	case recipe.Env:
		if s.env == nil {
			s.env = map[string]string{}
		}
		s.env[st.Key] = recipe.Expand(st.Value, s.lookup)
		return nil
	case recipe.Workdir:
		dir := s.resolve(st.Path)
		if err := s.asRoot(ctx, `[ -d "$1" ] || { mkdir -p -- "$1" && chown -- "$2:" "$1"; }`, e, dir, s.user); err != nil {
			return err
		}
		s.workdir = dir
		return nil
	case recipe.User:
		// As upstream: made if missing, with a home, bash and sudo without a password.
		if err := s.asRoot(ctx, `id -u -- "$1" >/dev/null 2>&1 || { useradd -m -s /bin/bash -- "$1" &&
			if [ -d /etc/sudoers.d ]; then printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$1" > "/etc/sudoers.d/wrenn-$1" && chmod 0440 "/etc/sudoers.d/wrenn-$1"; fi; }`, e, st.Key); err != nil {
			return err
		}
		s.user = st.Key
		s.readBase(ctx) // $HOME and the like are the new user's now
		return nil
	case recipe.Copy:
		args := []string{s.resolve(st.Dest), s.user}
		for _, src := range st.Sources {
			args = append(args, archiveDir+"/"+src)
		}
		// A destination ending in / (or taking several sources) is a directory.
		script := `dst=$1 owner=$2; shift 2
			case $dst in */) mkdir -p -- "$dst" ;; esac
			if [ $# -gt 1 ]; then mkdir -p -- "$dst"; fi
			for src in "$@"; do [ -e "$src" ] || { echo "COPY: $src is not in the uploaded archive" >&2; exit 1; }; done
			cp -r -- "$@" "$dst" && chown -R -- "$owner:" "$dst"`
		return s.asRoot(ctx, script, e, args...)
	}
	return fmt.Errorf("unknown step %q", st.Kind)
}

func (s *session) lookup(name string) string {
	if v, ok := s.env[name]; ok {
		return v
	}
	return s.base[name]
}

// resolve makes a path relative to the working directory absolute.
func (s *session) resolve(p string) string {
	if path.IsAbs(p) {
		return p
	}
	base := s.workdir
	if base == "" {
		base = "/"
	}
	out := path.Join(base, p)
	if strings.HasSuffix(p, "/") {
		out += "/"
	}
	return out
}

// asRoot runs a platform script (its arguments as $1...) as root.
func (s *session) asRoot(ctx context.Context, script string, e *StepLog, args ...string) error {
	resp, err := s.c.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: s.sandboxID, Cmd: "/bin/sh",
		Args: append([]string{"-c", script, "sh"}, args...), User: "root", TimeoutSeconds: 120}))
	if err != nil {
		return err
	}
	e.Stdout, e.Stderr, e.Exit = tail(resp.Msg.GetStdout()), tail(resp.Msg.GetStderr()), resp.Msg.GetExitCode()
	s.logf("%s%s", resp.Msg.GetStdout(), resp.Msg.GetStderr())
	if e.Exit != 0 {
		return fmt.Errorf("exited with code %d", e.Exit)
	}
	return nil
}

// stream runs a RUN step, its output going to the build log as it comes.
func (s *session) stream(ctx context.Context, shell string, timeout time.Duration, e *StepLog) error {
	tag := "build-" + strings.ToLower(ids.Random(8))
	stream, err := s.c.ExecStream(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: s.sandboxID, Cmd: "/bin/sh", Args: []string{"-c", shell},
		Env: s.env, Cwd: s.workdir, User: s.user, TimeoutSeconds: int32(timeout / time.Second), Tag: tag}))
	if err != nil {
		return err
	}
	defer stream.Close()
	var stdout, stderr tailBuffer
	defer func() { e.Stdout, e.Stderr = stdout.String(), stderr.String() }()
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *pb.ExecStreamResponse_Stdout:
			stdout.Write(ev.Stdout)
			s.logf("%s", ev.Stdout)
		case *pb.ExecStreamResponse_Stderr:
			stderr.Write(ev.Stderr)
			s.logf("%s", ev.Stderr)
		case *pb.ExecStreamResponse_ExitCode:
			e.Exit = ev.ExitCode
			if ev.ExitCode != 0 {
				return fmt.Errorf("exited with code %d", ev.ExitCode)
			}
			return nil
		}
	}
	if ctx.Err() != nil {
		// Cancelled: stop the command too (the agent keeps it otherwise).
		_, _ = s.c.KillProcess(context.WithoutCancel(ctx), connect.NewRequest(&pb.KillProcessRequest{Process: &pb.ProcessRef{SandboxId: s.sandboxID, Tag: tag}, Force: true}))
		return context.Cause(ctx)
	}
	if err := stream.Err(); err != nil {
		if connect.CodeOf(err) == connect.CodeDeadlineExceeded {
			return fmt.Errorf("still running after its timeout (%s) and killed", timeout)
		}
		return err
	}
	return errors.New("the command's output ended without an exit code")
}

// readBase reads the capsule's environment, for $NAME in ENV values.
func (s *session) readBase(ctx context.Context) {
	resp, err := s.c.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: s.sandboxID, Cmd: "env", Args: []string{"-0"}, User: s.user, TimeoutSeconds: 30}))
	s.base = map[string]string{}
	if err != nil {
		return
	}
	for _, kv := range bytes.Split(resp.Msg.GetStdout(), []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			s.base[k] = v
		}
	}
}

// unpack puts the build's archive, rewritten as a plain tar, in the
// capsule and unpacks it where COPY reads.
func (s *session) unpack(ctx context.Context, archive []byte) error {
	var tarred bytes.Buffer
	sum, err := buildarchive.Tar(archive, &tarred)
	if err != nil {
		return err
	}
	s.logf("== unpacking the archive (%s, %d entries, %d KiB) into %s\n", sum.Format, sum.Files, sum.Bytes>>10, archiveDir)
	up := s.c.WriteFileStream(ctx)
	if err := up.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Header{Header: &pb.WriteFileRequest{SandboxId: s.sandboxID, Path: archiveDir + ".tar", User: "root"}}}); err != nil {
		_, cerr := up.CloseAndReceive()
		return errors.Join(err, cerr)
	}
	for chunk := range slicesOf(tarred.Bytes(), 1<<20) {
		if err := up.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Data{Data: chunk}}); err != nil {
			_, cerr := up.CloseAndReceive()
			return errors.Join(err, cerr)
		}
	}
	if _, err := up.CloseAndReceive(); err != nil {
		return fmt.Errorf("upload the archive: %w", err)
	}
	var e StepLog
	if err := s.asRoot(ctx, `mkdir -p -- "$1" && tar -xf "$1.tar" -C "$1" --no-same-owner && rm -f -- "$1.tar" && chmod -R a+rX -- "$1"`, &e, archiveDir); err != nil {
		return fmt.Errorf("unpack the archive: %w: %s", err, e.Stderr)
	}
	return nil
}

// slicesOf yields b in pieces of at most n bytes.
func slicesOf(b []byte, n int) func(func([]byte) bool) {
	return func(yield func([]byte) bool) {
		for len(b) > 0 {
			k := min(n, len(b))
			if !yield(b[:k]) {
				return
			}
			b = b[k:]
		}
	}
}

// runtimeEnv reports variables a session sets itself; a template does
// not keep them as defaults (as upstream's builds).
func runtimeEnv(k string) bool {
	switch k {
	case "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "HOSTNAME", "TERM", "SHLVL", "_":
		return true
	}
	return false
}

// defaults are the user and variables a template keeps from its build.
func (s *session) defaults() (string, map[string]string) {
	env := maps.Clone(s.env)
	maps.DeleteFunc(env, func(k, _ string) bool { return runtimeEnv(k) })
	if env == nil {
		env = map[string]string{}
	}
	return s.user, env
}

// healthCheck runs the check until it passes, its counted failures run
// out or its deadline passes.
func (s *session) healthCheck(ctx context.Context, h *recipe.HealthCheck) error {
	s.logf("\n== health check: %s (every %s, each up to %s, at most %s)\n", h.Cmd, h.Interval, h.AttemptTimeout, h.Deadline)
	start := time.Now()
	failed := 0
	for attempt := 1; ; attempt++ {
		resp, err := s.c.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: s.sandboxID, Cmd: "/bin/sh", Args: []string{"-c", h.Cmd},
			Env: s.env, Cwd: s.workdir, User: s.user, TimeoutSeconds: int32(max(time.Second, h.AttemptTimeout) / time.Second)}))
		switch {
		case err != nil && ctx.Err() != nil:
			return context.Cause(ctx)
		case err != nil:
			s.logf("attempt %d: %v\n", attempt, err)
		case resp.Msg.GetExitCode() == 0:
			s.logf("attempt %d: passed\n", attempt)
			return nil
		default:
			s.logf("attempt %d: exit %d %s\n", attempt, resp.Msg.GetExitCode(), strings.TrimSpace(string(resp.Msg.GetStderr())))
		}
		if time.Since(start) >= h.StartPeriod {
			failed++
		}
		if h.Retries > 0 && failed >= h.Retries {
			return fmt.Errorf("health check failed %d times", failed)
		}
		if time.Since(start)+h.Interval > h.Deadline {
			return fmt.Errorf("health check did not pass within %s", h.Deadline)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(h.Interval):
		}
	}
}

// tailBuffer keeps the last maxStepOutput bytes written to it.
type tailBuffer struct {
	buf       []byte
	truncated bool
}

func (t *tailBuffer) Write(p []byte) {
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - maxStepOutput; over > 0 {
		t.buf, t.truncated = append(t.buf[:0], t.buf[over:]...), true
	}
}

func (t *tailBuffer) String() string {
	s := strings.ToValidUTF8(strings.ReplaceAll(string(t.buf), "\x00", ""), "\uFFFD")
	if t.truncated {
		return "[earlier output in the build's full log]\n" + s
	}
	return s
}

func tail(b []byte) string {
	var t tailBuffer
	t.Write(b)
	return t.String()
}

// encode is the per-step log as stored.
func encode(entries []StepLog) json.RawMessage {
	if entries == nil {
		entries = []StepLog{}
	}
	b, _ := json.Marshal(entries)
	return b
}
