// Package recipe reads template build recipes: a base template, steps run
// in order in a fresh capsule, and an optional health check that must pass
// before the capsule becomes the new template.
package recipe

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
	"unicode/utf8"
)

// Limits keep one recipe from holding a host for ever.
const (
	MaxCommands       = 100
	MaxCommandBytes   = 16 << 10
	MaxStepTimeoutSec = 2 * 3600
	MaxHealthSec      = 600
	MaxVCPUs          = 8
	MaxMemoryMB       = 16384
	MaxDiskMB         = 256 << 10
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Recipe is a validated build description, in either of two forms: upstream
// Wrenn's (a list of RUN/START/ENV/WORKDIR/USER/COPY lines under "recipe",
// a health check string, pre- and post-build phases) or this project's
// (shell commands under "commands" with envs and a user). Both become Steps.
type Recipe struct {
	// Name of the template the build makes.
	Name string
	// BaseTemplate is where it starts (default "minimal").
	BaseTemplate string
	// Steps run in order; the first that fails fails the build.
	Steps []Step
	// Lines are the steps as written (commands as "RUN <command>").
	Lines []string
	// Envs are set for every step and the health check.
	Envs map[string]string
	// User runs the steps until a USER step (default root).
	User string
	// StepTimeout bounds each RUN without its own --timeout (default 10 min).
	StepTimeout time.Duration
	// HealthCheck, when set, must pass before the template is saved, and
	// the template keeps the capsule's memory.
	HealthCheck *HealthCheck
	VCPUs       int
	MemoryMB    int
	// DiskSizeMB is the build capsule's disk (0: the platform's default).
	DiskSizeMB int
	// PrePost runs the platform's pre- and post-build phases around the
	// steps (upstream's form, unless skip_pre_post).
	PrePost bool
	// Stored is the normalized document kept with the build; Parse reads it
	// back to the same Recipe.
	Stored json.RawMessage
}

// UsesArchive reports whether a COPY step needs the build's archive.
func (r Recipe) UsesArchive() bool {
	for _, st := range r.Steps {
		if st.Kind == Copy {
			return true
		}
	}
	return false
}

// document is the JSON a build is submitted (and stored) as.
type document struct {
	Name         string            `json:"name"`
	BaseTemplate string            `json:"base_template"`
	Recipe       []string          `json:"recipe,omitempty"`
	Commands     []string          `json:"commands,omitempty"`
	Envs         map[string]string `json:"envs,omitempty"`
	User         string            `json:"user,omitempty"`
	StepTimeout  int               `json:"step_timeout_sec,omitempty"`
	HealthCheck  json.RawMessage   `json:"healthcheck,omitempty"`
	VCPUs        int               `json:"vcpus"`
	MemoryMB     int               `json:"memory_mb"`
	DiskSizeMB   int               `json:"disk_size_mb,omitempty"`
	SkipPrePost  bool              `json:"skip_pre_post,omitempty"`
}

// Parse reads JSON into a Recipe, rejecting unknown fields, filling
// defaults and checking every limit.
func Parse(data []byte) (Recipe, error) {
	var d document
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		return Recipe{}, fmt.Errorf("recipe is not valid JSON: %w", err)
	}
	if dec.More() {
		return Recipe{}, errors.New("recipe has data after its JSON object")
	}
	return d.recipe()
}

func (d *document) recipe() (Recipe, error) {
	if !nameRE.MatchString(d.Name) {
		return Recipe{}, errors.New("name must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if d.BaseTemplate == "" {
		d.BaseTemplate = "minimal"
	}
	if !nameRE.MatchString(d.BaseTemplate) {
		return Recipe{}, errors.New("base_template must be a template name")
	}
	r := Recipe{Name: d.Name, BaseTemplate: d.BaseTemplate}
	switch {
	case len(d.Recipe) > 0 && len(d.Commands) > 0:
		return Recipe{}, errors.New("give either recipe (instruction lines) or commands (shell commands), not both")
	case len(d.Recipe) > 0:
		if len(d.Recipe) > MaxCommands {
			return Recipe{}, fmt.Errorf("at most %d recipe lines", MaxCommands)
		}
		steps, err := ParseSteps(d.Recipe)
		if err != nil {
			return Recipe{}, err
		}
		r.Steps, r.Lines, r.PrePost = steps, d.Recipe, !d.SkipPrePost
	case len(d.Commands) > 0:
		if len(d.Commands) > MaxCommands {
			return Recipe{}, fmt.Errorf("at most %d commands", MaxCommands)
		}
		if d.SkipPrePost {
			return Recipe{}, errors.New("skip_pre_post applies to recipe lines: commands have no pre- or post-build phase")
		}
		for i, c := range d.Commands {
			if err := checkCommand(c); err != nil {
				return Recipe{}, fmt.Errorf("command %d: %w", i+1, err)
			}
			r.Steps = append(r.Steps, Step{Kind: Run, Line: "RUN " + c, Shell: c})
			r.Lines = append(r.Lines, "RUN "+c)
		}
	default:
		return Recipe{}, errors.New("recipe must list at least one instruction (or commands at least one command)")
	}
	if len(d.Envs) > 256 {
		return Recipe{}, errors.New("at most 256 environment variables")
	}
	for k, v := range d.Envs {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return Recipe{}, fmt.Errorf("environment variable %q: names must be non-empty without '=' and nothing may hold NUL", k)
		}
	}
	r.Envs = d.Envs
	if d.User == "" {
		d.User = "root"
	}
	if !nameRE.MatchString(d.User) {
		return Recipe{}, errors.New("user must be a user name")
	}
	r.User = d.User
	if d.StepTimeout == 0 {
		d.StepTimeout = 600
	}
	if d.StepTimeout < 1 || d.StepTimeout > MaxStepTimeoutSec {
		return Recipe{}, fmt.Errorf("step_timeout_sec must be between 1 and %d", MaxStepTimeoutSec)
	}
	r.StepTimeout = time.Duration(d.StepTimeout) * time.Second
	h, err := parseHealthJSON(d.HealthCheck)
	if err != nil {
		return Recipe{}, fmt.Errorf("healthcheck: %w", err)
	}
	r.HealthCheck = h
	if d.DiskSizeMB < 0 || d.DiskSizeMB > MaxDiskMB {
		return Recipe{}, fmt.Errorf("disk_size_mb must be between 0 (the default) and %d", MaxDiskMB)
	}
	if d.VCPUs == 0 {
		d.VCPUs = 1
	}
	if d.MemoryMB == 0 {
		d.MemoryMB = 512
	}
	if d.VCPUs < 1 || d.VCPUs > MaxVCPUs || d.MemoryMB < 128 || d.MemoryMB > MaxMemoryMB {
		return Recipe{}, fmt.Errorf("vcpus must be 1-%d and memory_mb 128-%d", MaxVCPUs, MaxMemoryMB)
	}
	r.VCPUs, r.MemoryMB, r.DiskSizeMB = d.VCPUs, d.MemoryMB, d.DiskSizeMB
	stored, err := json.Marshal(d)
	if err != nil {
		return Recipe{}, err
	}
	r.Stored = stored
	return r, nil
}

func checkCommand(c string) error {
	switch {
	case strings.TrimSpace(c) == "":
		return errors.New("empty command")
	case len(c) > MaxCommandBytes:
		return fmt.Errorf("longer than %d bytes", MaxCommandBytes)
	case !utf8.ValidString(c) || strings.ContainsRune(c, 0):
		return errors.New("not valid UTF-8 text")
	}
	return nil
}
