package recipe

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// HealthCheck is a command retried in the build capsule until it exits 0;
// a build with one saves the capsule's memory too, so what START began is
// running in every capsule made from the template.
type HealthCheck struct {
	Cmd string
	// Interval between attempts; AttemptTimeout bounds each.
	Interval, AttemptTimeout time.Duration
	// StartPeriod: failures in it do not count against Retries.
	StartPeriod time.Duration
	// Retries is how many counted failures end the check (0: no count,
	// only Deadline).
	Retries int
	// Deadline bounds the whole check.
	Deadline time.Duration
	// Text is the check as upstream's string form, for the API.
	Text string
}

// healthObject is this project's own form of the check.
type healthObject struct {
	Cmd         string `json:"cmd"`
	TimeoutSec  int    `json:"timeout_sec"`  // total time to pass (default 60)
	IntervalSec int    `json:"interval_sec"` // between attempts (default 2)
}

// parseHealthJSON reads either form: upstream's string
// ("[--interval=3s] [--timeout=10s] [--start-period=0s] [--retries=0] cmd")
// or the object {cmd, timeout_sec, interval_sec}.
func parseHealthJSON(raw json.RawMessage) (*HealthCheck, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" || string(raw) == `""` {
		return nil, nil
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, err
		}
		return ParseHealthCheck(s)
	}
	var o healthObject
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&o); err != nil {
		return nil, fmt.Errorf("healthcheck must be a command string or {cmd, timeout_sec, interval_sec}: %w", err)
	}
	if err := checkCommand(o.Cmd); err != nil {
		return nil, err
	}
	if o.TimeoutSec == 0 {
		o.TimeoutSec = 60
	}
	if o.IntervalSec == 0 {
		o.IntervalSec = 2
	}
	if o.TimeoutSec < 1 || o.TimeoutSec > MaxHealthSec || o.IntervalSec < 1 || o.IntervalSec > o.TimeoutSec {
		return nil, fmt.Errorf("timeout_sec must be 1-%d and interval_sec 1..timeout_sec", MaxHealthSec)
	}
	iv := time.Duration(o.IntervalSec) * time.Second
	return &HealthCheck{Cmd: o.Cmd, Interval: iv, AttemptTimeout: iv, Deadline: time.Duration(o.TimeoutSec) * time.Second,
		Text: fmt.Sprintf("--interval=%s --timeout=%s %s", iv, iv, o.Cmd)}, nil
}

// ParseHealthCheck reads upstream's string form. Defaults are upstream's
// (interval 3 s, each attempt 10 s, no start period, retries 0); with
// retries 0 the check is bounded by MaxHealthSec rather than running for
// ever, and with retries n by start period + (n+1) intervals.
func ParseHealthCheck(s string) (*HealthCheck, error) {
	if err := checkCommand(s); err != nil {
		return nil, err
	}
	h := &HealthCheck{Interval: 3 * time.Second, AttemptTimeout: 10 * time.Second}
	rest := strings.TrimSpace(s)
	for strings.HasPrefix(rest, "--") {
		var flag string
		flag, rest, _ = strings.Cut(rest, " ")
		rest = strings.TrimSpace(rest)
		name, value, ok := strings.Cut(flag, "=")
		if !ok {
			return nil, fmt.Errorf("healthcheck flag %q must be --name=value", flag)
		}
		if name == "--retries" {
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 || n > 10000 {
				return nil, fmt.Errorf("healthcheck --retries=%s: a count from 0 (no limit) to 10000", value)
			}
			h.Retries = n
			continue
		}
		d, err := time.ParseDuration(value)
		if err != nil || d < 0 || d > MaxHealthSec*time.Second {
			return nil, fmt.Errorf("healthcheck %s=%s: a duration up to %ds, such as 3s", name, value, MaxHealthSec)
		}
		switch name {
		case "--interval":
			h.Interval = d
		case "--timeout":
			h.AttemptTimeout = d
		case "--start-period":
			h.StartPeriod = d
		default:
			return nil, fmt.Errorf("unknown healthcheck flag %s: expected --interval, --timeout, --start-period or --retries", name)
		}
	}
	if rest == "" {
		return nil, errors.New("healthcheck has no command after its flags")
	}
	if h.Interval < 100*time.Millisecond || h.AttemptTimeout < time.Second {
		return nil, errors.New("healthcheck --interval must be at least 100ms and --timeout at least 1s")
	}
	h.Cmd, h.Text = rest, strings.TrimSpace(s)
	h.Deadline = MaxHealthSec * time.Second
	if h.Retries > 0 {
		h.Deadline = min(h.Deadline, h.StartPeriod+time.Duration(h.Retries+1)*h.Interval)
	}
	return h, nil
}
