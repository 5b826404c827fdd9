// Package recipe reads template build recipes: a base template, commands
// run in order in a fresh capsule, and an optional health check that must
// pass before the capsule's disk becomes the new template.
package recipe

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
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

// Recipe is a validated build description.
type Recipe struct {
	// Name of the template the build makes.
	Name string `json:"name"`
	// BaseTemplate is where it starts (default "minimal").
	BaseTemplate string `json:"base_template"`
	// Commands run one after another with /bin/sh -c; the first that
	// exits non-zero fails the build.
	Commands []string `json:"commands"`
	// Envs are set for every command and the health check.
	Envs map[string]string `json:"envs,omitempty"`
	// User runs the commands (default root).
	User string `json:"user"`
	// StepTimeoutSec bounds each command (default 600).
	StepTimeoutSec int `json:"step_timeout_sec"`
	// HealthCheck, when set, must exit 0 before the template is saved.
	HealthCheck *HealthCheck `json:"healthcheck,omitempty"`
	VCPUs       int          `json:"vcpus"`
	MemoryMB    int          `json:"memory_mb"`
	// DiskSizeMB is the build capsule's disk (0: the platform's default),
	// room for what the commands install.
	DiskSizeMB int `json:"disk_size_mb"`
}

// HealthCheck is retried until it passes or its time is up.
type HealthCheck struct {
	Cmd         string `json:"cmd"`
	TimeoutSec  int    `json:"timeout_sec"`  // total time to pass (default 60)
	IntervalSec int    `json:"interval_sec"` // between attempts (default 2)
}

// Parse reads JSON into a Recipe, rejecting unknown fields, filling
// defaults and checking every limit.
func Parse(data []byte) (Recipe, error) {
	var r Recipe
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Recipe{}, fmt.Errorf("recipe is not valid JSON: %w", err)
	}
	if dec.More() {
		return Recipe{}, errors.New("recipe has data after its JSON object")
	}
	return r, r.normalize()
}

func (r *Recipe) normalize() error {
	if !nameRE.MatchString(r.Name) {
		return errors.New("name must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if r.BaseTemplate == "" {
		r.BaseTemplate = "minimal"
	}
	if !nameRE.MatchString(r.BaseTemplate) {
		return errors.New("base_template must be a template name")
	}
	if len(r.Commands) == 0 {
		return errors.New("commands must list at least one command")
	}
	if len(r.Commands) > MaxCommands {
		return fmt.Errorf("at most %d commands", MaxCommands)
	}
	for i, c := range r.Commands {
		if err := checkCommand(c); err != nil {
			return fmt.Errorf("command %d: %w", i+1, err)
		}
	}
	if len(r.Envs) > 256 {
		return errors.New("at most 256 environment variables")
	}
	for k, v := range r.Envs {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return fmt.Errorf("environment variable %q: names must be non-empty without '=' and nothing may hold NUL", k)
		}
	}
	if r.User == "" {
		r.User = "root"
	}
	if !nameRE.MatchString(r.User) {
		return errors.New("user must be a user name")
	}
	if r.StepTimeoutSec == 0 {
		r.StepTimeoutSec = 600
	}
	if r.StepTimeoutSec < 1 || r.StepTimeoutSec > MaxStepTimeoutSec {
		return fmt.Errorf("step_timeout_sec must be between 1 and %d", MaxStepTimeoutSec)
	}
	if h := r.HealthCheck; h != nil {
		if err := checkCommand(h.Cmd); err != nil {
			return fmt.Errorf("healthcheck: %w", err)
		}
		if h.TimeoutSec == 0 {
			h.TimeoutSec = 60
		}
		if h.IntervalSec == 0 {
			h.IntervalSec = 2
		}
		if h.TimeoutSec < 1 || h.TimeoutSec > MaxHealthSec || h.IntervalSec < 1 || h.IntervalSec > h.TimeoutSec {
			return fmt.Errorf("healthcheck: timeout_sec must be 1-%d and interval_sec 1..timeout_sec", MaxHealthSec)
		}
	}
	if r.DiskSizeMB < 0 || r.DiskSizeMB > MaxDiskMB {
		return fmt.Errorf("disk_size_mb must be between 0 (the default) and %d", MaxDiskMB)
	}
	if r.VCPUs == 0 {
		r.VCPUs = 1
	}
	if r.MemoryMB == 0 {
		r.MemoryMB = 512
	}
	if r.VCPUs < 1 || r.VCPUs > MaxVCPUs || r.MemoryMB < 128 || r.MemoryMB > MaxMemoryMB {
		return fmt.Errorf("vcpus must be 1-%d and memory_mb 128-%d", MaxVCPUs, MaxMemoryMB)
	}
	return nil
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
