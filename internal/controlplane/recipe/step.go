package recipe

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"time"
)

// Kind is what a recipe instruction does.
type Kind string

// The instructions of upstream Wrenn's recipe language (a Dockerfile-like
// line per step).
const (
	Run     Kind = "RUN"     // run a command and wait for it
	Start   Kind = "START"   // start a command in the background
	Env     Kind = "ENV"     // set a variable for later steps
	Workdir Kind = "WORKDIR" // set (and make) the directory later steps run in
	User    Kind = "USER"    // switch (and create) the user later steps run as
	Copy    Kind = "COPY"    // copy files from the build's uploaded archive
)

// Step is one parsed instruction.
type Step struct {
	Kind Kind
	// Line is the instruction as written, for the build log.
	Line string
	// Shell is the command of RUN and START.
	Shell string
	// Timeout of a RUN (0: the recipe's step timeout).
	Timeout time.Duration
	// Key and Value of ENV; Key is also USER's user name.
	Key, Value string
	// Path of WORKDIR.
	Path string
	// Sources (relative to the archive) and Dest of COPY.
	Sources []string
	Dest    string
}

// userNameRE is what useradd accepts on Debian (and what is safe to name).
var userNameRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// envKeyRE is a shell variable name.
var envKeyRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ParseStep reads one instruction. The keyword is case-insensitive; what
// follows it is taken as written.
func ParseStep(line string) (Step, error) {
	if err := checkCommand(line); err != nil {
		return Step{}, err
	}
	line = strings.TrimSpace(line)
	word, rest, _ := strings.Cut(line, " ")
	rest = strings.TrimSpace(rest)
	st := Step{Kind: Kind(strings.ToUpper(word)), Line: line}
	switch st.Kind {
	case Run:
		if flag, ok := strings.CutPrefix(rest, "--timeout="); ok {
			value, cmd, _ := strings.Cut(flag, " ")
			d, err := time.ParseDuration(value)
			if err != nil || d < time.Second || d > MaxStepTimeoutSec*time.Second {
				return Step{}, fmt.Errorf("RUN --timeout=%s: a duration from 1s to %s, such as 90s or 5m", value, time.Duration(MaxStepTimeoutSec)*time.Second)
			}
			st.Timeout, rest = d, strings.TrimSpace(cmd)
		}
		if rest == "" {
			return Step{}, errors.New("RUN needs a command")
		}
		st.Shell = rest
	case Start:
		if rest == "" {
			return Step{}, errors.New("START needs a command")
		}
		st.Shell = rest
	case Env:
		k, v, ok := strings.Cut(rest, "=")
		if !ok || !envKeyRE.MatchString(k) {
			return Step{}, errors.New("ENV needs NAME=value, NAME a shell variable name")
		}
		st.Key, st.Value = k, v
	case Workdir:
		if rest == "" {
			return Step{}, errors.New("WORKDIR needs a path")
		}
		st.Path = rest
	case User:
		if !userNameRE.MatchString(rest) {
			return Step{}, errors.New("USER needs a user name: lower-case letters, digits, '_' or '-', starting with a letter or '_'")
		}
		st.Key = rest
	case Copy:
		parts := strings.Fields(rest)
		if len(parts) < 2 {
			return Step{}, errors.New("COPY needs <source>... <destination>")
		}
		for _, src := range parts[:len(parts)-1] {
			clean := path.Clean(src)
			if path.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
				return Step{}, fmt.Errorf("COPY source %q must be a path inside the uploaded archive", src)
			}
			st.Sources = append(st.Sources, clean)
		}
		st.Dest = parts[len(parts)-1]
	default:
		return Step{}, fmt.Errorf("unknown instruction %q: expected RUN, START, ENV, WORKDIR, USER or COPY", word)
	}
	return st, nil
}

// ParseSteps reads a recipe's lines, naming the first bad one.
func ParseSteps(lines []string) ([]Step, error) {
	steps := make([]Step, 0, len(lines))
	for i, line := range lines {
		st, err := ParseStep(line)
		if err != nil {
			return nil, fmt.Errorf("recipe line %d: %w", i+1, err)
		}
		steps = append(steps, st)
	}
	return steps, nil
}

// envRefRE finds $$, ${NAME} and $NAME in an ENV value.
var envRefRE = regexp.MustCompile(`\$\$|\$\{([A-Za-z0-9_]*)\}|\$([A-Za-z0-9_]+)`)

// Expand replaces $NAME and ${NAME} in an ENV value with the variable's
// value (empty when unset), and $$ with $, as upstream's builds do.
func Expand(value string, lookup func(string) string) string {
	return envRefRE.ReplaceAllStringFunc(value, func(ref string) string {
		if ref == "$$" {
			return "$"
		}
		name := strings.Trim(ref, "${}")
		return lookup(name)
	})
}
