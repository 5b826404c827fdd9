package api

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/builder"
)

type buildOut struct {
	ID, Name, Status, Error string
	SandboxID               *string `json:"sandbox_id"`
	Logs                    string  `json:"logs"`
	LogsSize                int     `json:"logs_size"`
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
	if bd.Status != "queued" {
		t.Fatalf("submitted: %+v", bd)
	}
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "with-tool", "commands": []string{"true"}}), 409)
	run()
	got := get(bd.ID, "")
	if got.Status != "succeeded" || got.Error != "" {
		t.Fatalf("build: %+v", got)
	}
	for _, want := range []string{"$ echo building", "building\n", "to-stderr", "health check", "passed", "is ready"} {
		if !strings.Contains(got.Logs, want) {
			t.Fatalf("log lacks %q:\n%s", want, got.Logs)
		}
	}
	if tail := get(bd.ID, "?logs_from=10"); tail.Logs != got.Logs[10:] || tail.LogsSize != len(got.Logs) {
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
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 202)
	c.want(c.do("DELETE", "/v1/snapshots/with-tool", creds{key: key}, nil), 204)

	// A failing command fails the build and says which.
	c.want(c.do("POST", "/v1/builds", creds{key: key}, map[string]any{"name": "broken", "memory_mb": 256, "commands": []string{"echo first", "exit 3", "echo never"}}), 202).json(t, &bd)
	run()
	got = get(bd.ID, "")
	if got.Status != "failed" || got.Error != "command 2 exited with code 3" || strings.Contains(got.Logs, "never\n") {
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
