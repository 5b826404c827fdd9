package recipe

import (
	"strings"
	"testing"
	"time"
)

func TestParseDefaults(t *testing.T) {
	r, err := Parse([]byte(`{"name": "py", "commands": ["echo hi"], "healthcheck": {"cmd": "true"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if r.BaseTemplate != "minimal" || r.User != "root" || r.StepTimeout != 10*time.Minute || r.VCPUs != 1 || r.MemoryMB != 512 ||
		r.HealthCheck.Deadline != time.Minute || r.HealthCheck.Interval != 2*time.Second || r.PrePost {
		t.Fatalf("%+v %+v", r, r.HealthCheck)
	}
	if len(r.Steps) != 1 || r.Steps[0].Kind != Run || r.Steps[0].Shell != "echo hi" || r.Lines[0] != "RUN echo hi" {
		t.Fatalf("steps %+v lines %q", r.Steps, r.Lines)
	}
}

// Upstream Wrenn's form: instruction lines, a health check string, the
// pre- and post-build phases unless skipped; stored and read back alike.
func TestParseUpstreamForm(t *testing.T) {
	doc := `{"name": "web", "base_template": "minimal", "recipe": [
		"RUN --timeout=5m apt-get install -y nginx", "start nginx -g 'daemon off;'", "ENV PATH=/opt/bin:$PATH",
		"WORKDIR /srv", "USER app", "COPY site conf/a.conf /srv/"],
		"healthcheck": "--interval=1s --timeout=2s --start-period=5s --retries=4 curl -fs localhost", "vcpus": 2, "memory_mb": 1024}`
	r, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if !r.PrePost || len(r.Steps) != 6 || !r.UsesArchive() {
		t.Fatalf("%+v", r)
	}
	want := []Step{
		{Kind: Run, Shell: "apt-get install -y nginx", Timeout: 5 * time.Minute},
		{Kind: Start, Shell: "nginx -g 'daemon off;'"},
		{Kind: Env, Key: "PATH", Value: "/opt/bin:$PATH"},
		{Kind: Workdir, Path: "/srv"},
		{Kind: User, Key: "app"},
		{Kind: Copy, Sources: []string{"site", "conf/a.conf"}, Dest: "/srv/"},
	}
	for i, w := range want {
		got := r.Steps[i]
		got.Line = ""
		if got.Kind != w.Kind || got.Shell != w.Shell || got.Timeout != w.Timeout || got.Key != w.Key || got.Value != w.Value ||
			got.Path != w.Path || strings.Join(got.Sources, ",") != strings.Join(w.Sources, ",") || got.Dest != w.Dest {
			t.Errorf("step %d: %+v, want %+v", i+1, got, w)
		}
	}
	h := r.HealthCheck
	if h.Cmd != "curl -fs localhost" || h.Interval != time.Second || h.AttemptTimeout != 2*time.Second || h.StartPeriod != 5*time.Second ||
		h.Retries != 4 || h.Deadline != 10*time.Second {
		t.Fatalf("health check %+v", h)
	}
	again, err := Parse(r.Stored)
	if err != nil || len(again.Steps) != 6 || again.HealthCheck.Text != h.Text || !again.PrePost {
		t.Fatalf("stored form read back: %+v %v", again, err)
	}
	if r, _ := Parse([]byte(`{"name": "x", "recipe": ["RUN true"], "skip_pre_post": true, "healthcheck": "true"}`)); r.PrePost ||
		r.HealthCheck.Interval != 3*time.Second || r.HealthCheck.AttemptTimeout != 10*time.Second || r.HealthCheck.Deadline != MaxHealthSec*time.Second {
		t.Fatalf("skip_pre_post and health check defaults: %+v %+v", r, r.HealthCheck)
	}
}

func TestExpand(t *testing.T) {
	vars := map[string]string{"PATH": "/bin", "HOME": "/root"}
	get := func(k string) string { return vars[k] }
	for in, want := range map[string]string{
		"/opt:$PATH": "/opt:/bin", "${HOME}/x": "/root/x", "$$HOME": "$HOME", "$NOPE-": "-", "plain": "plain",
	} {
		if got := Expand(in, get); got != want {
			t.Errorf("Expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for name, doc := range map[string]string{
		"not json":           `name: x`,
		"unknown field":      `{"name": "x", "commands": ["true"], "dockerfile": "FROM x"}`,
		"trailing data":      `{"name": "x", "commands": ["true"]} {}`,
		"bad name":           `{"name": "../x", "commands": ["true"]}`,
		"no commands":        `{"name": "x", "commands": []}`,
		"blank command":      `{"name": "x", "commands": ["  "]}`,
		"NUL in command":     `{"name": "x", "commands": ["a\u0000b"]}`,
		"huge command":       `{"name": "x", "commands": ["` + strings.Repeat("a", MaxCommandBytes+1) + `"]}`,
		"bad base":           `{"name": "x", "base_template": "a b", "commands": ["true"]}`,
		"bad env":            `{"name": "x", "commands": ["true"], "envs": {"A=B": "c"}}`,
		"bad user":           `{"name": "x", "commands": ["true"], "user": "root; rm"}`,
		"step timeout":       `{"name": "x", "commands": ["true"], "step_timeout_sec": -1}`,
		"health no cmd":      `{"name": "x", "commands": ["true"], "healthcheck": {}}`,
		"health interval":    `{"name": "x", "commands": ["true"], "healthcheck": {"cmd": "true", "timeout_sec": 5, "interval_sec": 9}}`,
		"too much memory":    `{"name": "x", "commands": ["true"], "memory_mb": 99999}`,
		"wrong field types":  `{"name": 5, "commands": "true"}`,
		"both forms":         `{"name": "x", "commands": ["true"], "recipe": ["RUN true"]}`,
		"skip with commands": `{"name": "x", "commands": ["true"], "skip_pre_post": true}`,
		"unknown keyword":    `{"name": "x", "recipe": ["FROM debian"]}`,
		"RUN nothing":        `{"name": "x", "recipe": ["RUN"]}`,
		"RUN bad timeout":    `{"name": "x", "recipe": ["RUN --timeout=soon true"]}`,
		"RUN timeout only":   `{"name": "x", "recipe": ["RUN --timeout=5s"]}`,
		"ENV no value":       `{"name": "x", "recipe": ["ENV A"]}`,
		"ENV bad name":       `{"name": "x", "recipe": ["ENV 1A=b"]}`,
		"USER bad":           `{"name": "x", "recipe": ["USER ro;ot"]}`,
		"COPY one arg":       `{"name": "x", "recipe": ["COPY a"]}`,
		"COPY escapes":       `{"name": "x", "recipe": ["COPY ../etc/passwd /x"]}`,
		"COPY absolute":      `{"name": "x", "recipe": ["COPY /etc/passwd /x"]}`,
		"health flag":        `{"name": "x", "recipe": ["RUN true"], "healthcheck": "--every=3s true"}`,
		"health flags only":  `{"name": "x", "recipe": ["RUN true"], "healthcheck": "--interval=3s"}`,
		"health bad retries": `{"name": "x", "recipe": ["RUN true"], "healthcheck": "--retries=-1 true"}`,
		"health 0 interval":  `{"name": "x", "recipe": ["RUN true"], "healthcheck": "--interval=0s true"}`,
	} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzParse: any input either fails cleanly or gives a recipe that
// satisfies every limit and reads back the same from its stored form.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"name": "py", "commands": ["apt-get install -y python3"], "healthcheck": {"cmd": "python3 -V"}}`))
	f.Add([]byte(`{"name": "x", "commands": ["true"], "envs": {"A": "b"}, "vcpus": 2, "memory_mb": 1024}`))
	f.Add([]byte(`{"name": "x", "recipe": ["RUN --timeout=1m true", "ENV A=$B", "USER u", "COPY a b"], "healthcheck": "--retries=2 true"}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Parse(data)
		if err != nil {
			return
		}
		if !nameRE.MatchString(r.Name) || len(r.Steps) == 0 || len(r.Steps) > MaxCommands || r.VCPUs < 1 || r.MemoryMB < 128 || len(r.Lines) != len(r.Steps) {
			t.Fatalf("accepted an invalid recipe: %+v", r)
		}
		for _, st := range r.Steps {
			if checkCommand(st.Line) != nil {
				t.Fatalf("accepted step %q", st.Line)
			}
		}
		again, err := Parse(r.Stored)
		if err != nil || len(again.Steps) != len(r.Steps) || again.PrePost != r.PrePost {
			t.Fatalf("stored form %s read back as %+v, %v", r.Stored, again, err)
		}
	})
}
