package api

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"log/slog"
	"mime/multipart"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/builder"
)

type buildOut struct {
	ID, Name, Status, Error string
	SandboxID               *string `json:"sandbox_id"`
	Logs                    string  `json:"output"`
	LogsSize                int     `json:"output_size"`
	Recipe                  []string
	Healthcheck             *string
	CurrentStep             int               `json:"current_step"`
	TotalSteps              int               `json:"total_steps"`
	Steps                   []builder.StepLog `json:"logs"`
	DefaultUser             string            `json:"default_user"`
	DefaultEnv              map[string]string `json:"default_env"`
}

// A recipe becomes a template on a real agent: commands run in a capsule
// with their output in the build log, the health check passes, the disk is
// saved, and capsules start from it. Failures and cancellation end cleanly.
func TestTemplateBuildOnARealAgent(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	c.startAgent(admin)
	key := c.apiKey(admin)
	b := &builder.Builder{Store: c.st, Capsules: c.srv, Log: slog.New(slog.DiscardHandler)}
	run := func() {
		t.Helper()
		if err := b.Pass(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	get := func(id, query string) buildOut {
		t.Helper()
		var out buildOut
		c.want(c.do("GET", "/v1/builds/"+id+query, creds{key: key}, nil), 200).json(t, &out)
		return out
	}

	var bd buildOut
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "with-tool", "memory_mb": 256,
		"commands":    []string{"echo building; mkdir -p /opt/tool && echo v1 > /opt/tool/version", "echo to-stderr >&2"},
		"healthcheck": map[string]any{"cmd": "test -f /opt/tool/version", "timeout_sec": 30}}), 202).json(t, &bd)
	if bd.Status != "pending" {
		t.Fatalf("submitted: %+v", bd)
	}
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "with-tool", "commands": []string{"true"}}), 409)
	run()
	got := get(bd.ID, "")
	if got.Status != "success" || got.Error != "" || got.DefaultUser != "root" {
		t.Fatalf("build: %+v", got)
	}
	for _, want := range []string{"$ RUN echo building", "building\n", "to-stderr", "health check", "passed", "is ready"} {
		if !strings.Contains(got.Logs, want) {
			t.Fatalf("log lacks %q:\n%s", want, got.Logs)
		}
	}
	if tail := get(bd.ID, "?output_from=10"); tail.Logs != got.Logs[10:] || tail.LogsSize != len(got.Logs) {
		t.Fatalf("logs_from: %d bytes of %d", len(tail.Logs), tail.LogsSize)
	}
	var buildCapsule capsuleOut
	c.want(c.do("GET", "/v1/capsules/"+*got.SandboxID, creds{key: key}, nil), 200).json(t, &buildCapsule)
	if buildCapsule.Status != "stopped" {
		t.Fatalf("the build capsule was left %s", buildCapsule.Status)
	}

	// The template is the team's, and capsules start from it.
	var tpls []struct{ Name, Type string }
	c.want(c.do("GET", "/v1/snapshots", creds{key: key}, nil), 200).json(t, &tpls)
	if !strings.Contains(" "+tplNames(tpls)+" ", " with-tool ") {
		t.Fatalf("templates: %+v", tpls)
	}
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"template": "with-tool", "memory_mb": 256}), 201).json(t, &sb)
	if out, _ := c.exec(key, sb.ID, "cat", "/opt/tool/version"); out != "v1\n" {
		t.Fatalf("capsule from the built template: %q", out)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
	c.want(c.do("DELETE", "/v1/snapshots/with-tool", creds{key: key}, nil), 204)

	// A failing command fails the build and says which.
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "broken", "memory_mb": 256, "commands": []string{"echo first", "exit 3", "echo never"}}), 202).json(t, &bd)
	run()
	got = get(bd.ID, "")
	if got.Status != "failed" || got.Error != "recipe step 2 (RUN exit 3): exited with code 3" || strings.Contains(got.Logs, "never\n") ||
		len(got.Steps) != 2 || got.Steps[1].Ok || got.Steps[1].Exit != 3 || !got.Steps[0].Ok || got.Steps[0].Stdout != "first\n" {
		t.Fatalf("failed build: %+v", got)
	}
	c.want(c.do("GET", "/v1/capsules/"+*got.SandboxID, creds{key: key}, nil), 200).json(t, &buildCapsule)
	if buildCapsule.Status != "stopped" {
		t.Fatalf("the failed build's capsule was left %s", buildCapsule.Status)
	}

	// A queued build cancelled never runs; a finished one cannot be cancelled.
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "unwanted", "commands": []string{"true"}}), 202).json(t, &bd)
	c.want(c.do("POST", "/v1/builds/"+bd.ID+"/cancel", creds{key: key}, nil), 204)
	run()
	if got = get(bd.ID, ""); got.Status != "cancelled" || got.SandboxID != nil {
		t.Fatalf("cancelled build: %+v", got)
	}
	c.want(c.do("POST", "/v1/builds/"+bd.ID+"/cancel", creds{key: key}, nil), 409)

	// A running build cancelled stops within seconds and leaves nothing running.
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "slow", "memory_mb": 256, "commands": []string{"echo sleeping; sleep 600"}}), 202).json(t, &bd)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = b.Pass(context.Background())
	}()
	deadline := time.Now().Add(time.Minute)
	for got = get(bd.ID, ""); !strings.Contains(got.Logs, "sleeping"); got = get(bd.ID, "") {
		if time.Now().After(deadline) {
			t.Fatalf("the slow build did not start: %+v", got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.want(c.do("POST", "/v1/builds/"+bd.ID+"/cancel", creds{key: key}, nil), 204)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the cancelled build did not stop within 30 s")
	}
	if got = get(bd.ID, ""); got.Status != "cancelled" {
		t.Fatalf("cancelled running build: %+v", got)
	}
	c.want(c.do("GET", "/v1/capsules/"+*got.SandboxID, creds{key: key}, nil), 200).json(t, &buildCapsule)
	if buildCapsule.Status != "stopped" {
		t.Fatalf("the cancelled build's capsule was left %s", buildCapsule.Status)
	}

	// Bad recipes; other teams see nothing.
	for _, body := range []map[string]any{{"name": "x"}, {"name": "x", "commands": []string{"true"}, "base_template": "nope"}, {"name": "../x", "commands": []string{"true"}}} {
		c.want(c.do("POST", "/v1/builds", creds{key: key}, body), 400)
	}
	other := c.signup("other@example.com")
	c.want(c.do("GET", "/v1/builds/"+bd.ID, creds{jwt: other.jwt}, nil), 404)
	c.want(c.do("POST", "/v1/admin/builds", creds{jwt: other.jwt}, map[string]any{"name": "p", "commands": []string{"true"}}), 403)
}

func tplNames(ts []struct{ Name, Type string }) string {
	var names []string
	for _, t := range ts {
		names = append(names, t.Name)
	}
	return strings.Join(names, " ")
}

// A build in upstream Wrenn's form, sent as upstream's dashboard sends it
// (multipart: the recipe as JSON in "config", the files in "archive"):
// every instruction, the pre- and post-build phases, a health check string,
// per-step logs, and a template that keeps the recipe's user, variables
// and what START began.
func TestUpstreamFormBuildOnARealAgent(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	c.startAgent(admin)
	key := c.apiKey(admin)
	// The platform's pre-build phase without its apt-get update: nothing
	// here may reach Debian's mirrors.
	pre := []string{"USER wrenn-user", "WORKDIR /home/wrenn-user"}
	b := &builder.Builder{Store: c.st, Capsules: c.srv, Log: slog.New(slog.DiscardHandler), PreBuild: pre}

	lines := []string{
		"ENV GREETING=hello",
		"ENV PATH=/opt/tools:$PATH",
		`RUN --timeout=30s echo "$GREETING from $(whoami) in $(pwd)"`,
		"USER app",
		"WORKDIR /srv/app",
		"COPY site conf/app.conf ./",
		"RUN test -O site/index.html && test -O app.conf && cat site/index.html",
		"START sh -c 'echo started > /tmp/started; exec sleep 100000'",
	}
	config, _ := json.Marshal(map[string]any{"name": "upstream-web", "memory_mb": 256, "recipe": lines,
		"healthcheck": "--interval=500ms --timeout=5s --retries=60 test -f /tmp/started"})
	archive := tarGz(t, map[string]string{"site/index.html": "<h1>hi</h1>\n", "conf/app.conf": "port=80\n"})
	post := func(fields map[string]string, files map[string][]byte) response {
		t.Helper()
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		for k, v := range fields {
			_ = mw.WriteField(k, v)
		}
		for k, v := range files {
			w, _ := mw.CreateFormFile(k, k+".tar.gz")
			_, _ = w.Write(v)
		}
		_ = mw.Close()
		return c.doRaw("POST", "/v1/admin/builds", creds{jwt: admin.jwt}, mw.FormDataContentType(), body.Bytes())
	}
	// What is wrong is refused at once.
	c.want(c.do("POST", "/v1/admin/builds", creds{jwt: admin.jwt}, string(config)), 400) // COPY with no archive
	c.want(post(map[string]string{"config": string(config)}, map[string][]byte{"archive": []byte("not an archive, just text that is long enough")}), 400)
	c.want(post(nil, map[string][]byte{"archive": archive}), 400)
	c.want(c.do("POST", "/v1/admin/builds", creds{jwt: admin.jwt}, map[string]any{"name": "x", "recipe": []string{"FROM debian"}}), 400)

	var bd buildOut
	c.want(post(map[string]string{"config": string(config)}, map[string][]byte{"archive": archive}), 201).json(t, &bd)
	if bd.Status != "pending" || len(bd.Recipe) != len(lines) || bd.Healthcheck == nil || *bd.Healthcheck != "--interval=500ms --timeout=5s --retries=60 test -f /tmp/started" ||
		bd.TotalSteps != len(builder.PreBuild())+len(lines)+len(builder.PostBuild()) {
		t.Fatalf("submitted: %+v", bd)
	}
	if err := b.Pass(t.Context()); err != nil {
		t.Fatal(err)
	}
	var got buildOut
	c.want(c.do("GET", "/v1/admin/builds/"+bd.ID, creds{jwt: admin.jwt}, nil), 200).json(t, &got)
	if got.Status != "success" || got.Error != "" {
		t.Fatalf("build: %+v\n%s", got, got.Logs)
	}
	want := len(pre) + len(lines) + len(builder.PostBuild())
	if got.TotalSteps != want || got.CurrentStep != want || len(got.Steps) != want {
		t.Fatalf("steps: current %d total %d entries %d, want %d", got.CurrentStep, got.TotalSteps, len(got.Steps), want)
	}
	for i, st := range got.Steps {
		phase := "recipe"
		switch {
		case i < len(pre):
			phase = "pre-build"
		case i >= len(pre)+len(lines):
			phase = "post-build"
		}
		if st.Step != i+1 || st.Phase != phase || !st.Ok || st.Exit != 0 {
			t.Errorf("step %d: %+v", i+1, st)
		}
	}
	if s := got.Steps[len(pre)+2]; s.Stdout != "hello from wrenn-user in /home/wrenn-user\n" || s.Cmd != lines[2] {
		t.Errorf("ENV, USER and WORKDIR of the pre-build phase: %+v", s)
	}
	if s := got.Steps[len(pre)+6]; s.Stdout != "<h1>hi</h1>\n" {
		t.Errorf("COPY: %+v", s)
	}
	if got.DefaultUser != "app" || got.DefaultEnv["GREETING"] != "hello" || !strings.HasPrefix(got.DefaultEnv["PATH"], "/opt/tools:/") {
		t.Errorf("defaults: %q %v", got.DefaultUser, got.DefaultEnv)
	}
	for _, want := range []string{"== pre-build", "== recipe", "== post-build", "$ USER app", "health check", "passed"} {
		if !strings.Contains(got.Logs, want) {
			t.Errorf("output lacks %q:\n%s", want, got.Logs)
		}
	}
	var list []buildOut
	c.want(c.do("GET", "/v1/admin/builds", creds{jwt: admin.jwt}, nil), 200).json(t, &list)
	if len(list) == 0 || list[0].ID != bd.ID || len(list[0].Steps) != want {
		t.Fatalf("list: %+v", list)
	}

	// A capsule from the template runs as its user, with its variables,
	// and with what START began still running (the template has memory).
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"template": "upstream-web", "memory_mb": 256}), 201).json(t, &sb)
	for cmd, want := range map[string]string{
		"whoami":           "app\n",
		"echo $GREETING":   "hello\n",
		"cat /tmp/started": "started\n",
		"pgrep -f 'sleep 100000' >/dev/null && echo running": "running\n",
		"cat /srv/app/app.conf":                              "port=80\n",
		"test -e /tmp/build-files || echo cleaned":           "cleaned\n",
	} {
		if out, code := c.exec(key, sb.ID, "/bin/sh", "-c", cmd); out != want {
			t.Errorf("%s: %q (exit %d), want %q", cmd, out, code, want)
		}
	}
	var asRoot struct{ Stdout string }
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/exec", creds{key: key}, map[string]any{"cmd": "whoami", "user": "root"}), 200).json(t, &asRoot)
	if asRoot.Stdout != "root\n" {
		t.Errorf("an explicit user: %q", asRoot.Stdout)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
}

func tarGz(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for name, body := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		_, _ = tw.Write([]byte(body))
	}
	_ = tw.Close()
	_ = zw.Close()
	return buf.Bytes()
}
