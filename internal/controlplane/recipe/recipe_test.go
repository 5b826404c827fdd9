package recipe

import (
	"strings"
	"testing"
)

func TestParseDefaults(t *testing.T) {
	r, err := Parse([]byte(`{"name": "py", "commands": ["echo hi"], "healthcheck": {"cmd": "true"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if r.BaseTemplate != "minimal" || r.User != "root" || r.StepTimeoutSec != 600 || r.VCPUs != 1 || r.MemoryMB != 512 ||
		r.HealthCheck.TimeoutSec != 60 || r.HealthCheck.IntervalSec != 2 {
		t.Fatalf("%+v %+v", r, r.HealthCheck)
	}
}

func TestParseRejects(t *testing.T) {
	for name, doc := range map[string]string{
		"not json":          `name: x`,
		"unknown field":     `{"name": "x", "commands": ["true"], "dockerfile": "FROM x"}`,
		"trailing data":     `{"name": "x", "commands": ["true"]} {}`,
		"bad name":          `{"name": "../x", "commands": ["true"]}`,
		"no commands":       `{"name": "x", "commands": []}`,
		"blank command":     `{"name": "x", "commands": ["  "]}`,
		"NUL in command":    `{"name": "x", "commands": ["a\u0000b"]}`,
		"huge command":      `{"name": "x", "commands": ["` + strings.Repeat("a", MaxCommandBytes+1) + `"]}`,
		"bad base":          `{"name": "x", "base_template": "a b", "commands": ["true"]}`,
		"bad env":           `{"name": "x", "commands": ["true"], "envs": {"A=B": "c"}}`,
		"bad user":          `{"name": "x", "commands": ["true"], "user": "root; rm"}`,
		"step timeout":      `{"name": "x", "commands": ["true"], "step_timeout_sec": -1}`,
		"health no cmd":     `{"name": "x", "commands": ["true"], "healthcheck": {}}`,
		"health interval":   `{"name": "x", "commands": ["true"], "healthcheck": {"cmd": "true", "timeout_sec": 5, "interval_sec": 9}}`,
		"too much memory":   `{"name": "x", "commands": ["true"], "memory_mb": 99999}`,
		"wrong field types": `{"name": 5, "commands": "true"}`,
	} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzParse: any input either fails cleanly or gives a recipe that
// satisfies every limit.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"name": "py", "commands": ["apt-get install -y python3"], "healthcheck": {"cmd": "python3 -V"}}`))
	f.Add([]byte(`{"name": "x", "commands": ["true"], "envs": {"A": "b"}, "vcpus": 2, "memory_mb": 1024}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Parse(data)
		if err != nil {
			return
		}
		if !nameRE.MatchString(r.Name) || len(r.Commands) == 0 || len(r.Commands) > MaxCommands || r.VCPUs < 1 || r.MemoryMB < 128 {
			t.Fatalf("accepted an invalid recipe: %+v", r)
		}
		for _, c := range r.Commands {
			if checkCommand(c) != nil {
				t.Fatalf("accepted command %q", c)
			}
		}
	})
}
