// Package envvars holds the one rule for the environment variables a
// sandbox is created with, so that the control plane refuses at once what
// its host agent would refuse later.
package envvars

import (
	"fmt"
	"regexp"
	"strings"
)

// Limits of a sandbox's environment.
const (
	MaxVars      = 256
	MaxValueSize = 32 << 10
)

var validName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Validate says what is wrong with env, or nil: at most MaxVars names, each
// a shell identifier, with values of at most MaxValueSize bytes and no NUL.
func Validate(env map[string]string) error {
	if len(env) > MaxVars {
		return fmt.Errorf("at most %d environment variables, not %d", MaxVars, len(env))
	}
	for k, v := range env {
		if !validName.MatchString(k) {
			return fmt.Errorf("environment variable name %q: use letters, digits and underscores, not starting with a digit", clip(k))
		}
		if len(v) > MaxValueSize || strings.IndexByte(v, 0) >= 0 {
			return fmt.Errorf("environment variable %s: values are at most %d bytes, without NUL", k, MaxValueSize)
		}
	}
	return nil
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
