package wrenn

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

// Template is something capsules start from: a base image or a team's
// snapshot or build.
type Template struct {
	Name      string            `json:"name"`
	Type      string            `json:"type"` // base or snapshot
	VCPUs     *int              `json:"vcpus"`
	MemoryMB  *int              `json:"memory_mb"`
	SizeBytes int64             `json:"size_bytes"`
	CreatedAt time.Time         `json:"created_at"`
	Platform  bool              `json:"platform"` // every team's (not deletable by a team)
	Metadata  map[string]string `json:"metadata"`
	// HasMemory: a snapshot of a running or paused capsule keeps its memory;
	// capsules of the same vcpus and memory start from it, with its processes.
	HasMemory   bool  `json:"has_memory"`
	MemoryBytes int64 `json:"memory_bytes"`
	// WarmPoolSize is how many ready capsules of it its hosts keep (nil:
	// the hosts' own setting).
	WarmPoolSize *int `json:"warm_pool_size"`
}

// SetWarmPool sets how many ready capsules of one of the team's templates
// its host keeps (0 to 4; nil leaves it to the host): creates of the
// template's shape then take one instead of starting a VM.
func (c *Client) SetWarmPool(ctx context.Context, name string, size *int) (Template, error) {
	var out Template
	err := c.do(ctx, http.MethodPut, "/v1/snapshots/"+url.PathEscape(name)+"/warm-pool", map[string]*int{"size": size}, &out)
	return out, err
}

// ListTemplates lists the platform's templates and the team's own.
func (c *Client) ListTemplates(ctx context.Context) ([]Template, error) {
	var out []Template
	err := c.do(ctx, http.MethodGet, "/v1/snapshots", nil, &out)
	return out, err
}

// DeleteTemplate deletes one of the team's templates.
func (c *Client) DeleteTemplate(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/snapshots/"+url.PathEscape(name), nil, nil)
}

// CreateSnapshot saves a running capsule (memory and disk) as a template
// named name (generated when empty); the capsule keeps running.
func (c *Client) CreateSnapshot(ctx context.Context, capsuleID, name string) (Template, error) {
	var out Template
	err := c.do(ctx, http.MethodPost, "/v1/snapshots", map[string]string{"sandbox_id": capsuleID, "name": name}, &out)
	return out, err
}

// Recipe describes a template build.
type Recipe struct {
	Name           string            `json:"name"`
	BaseTemplate   string            `json:"base_template,omitempty"`
	Commands       []string          `json:"commands"`
	Envs           map[string]string `json:"envs,omitempty"`
	User           string            `json:"user,omitempty"`
	StepTimeoutSec int               `json:"step_timeout_sec,omitempty"`
	HealthCheck    *HealthCheck      `json:"healthcheck,omitempty"`
	VCPUs          int               `json:"vcpus,omitempty"`
	MemoryMB       int               `json:"memory_mb,omitempty"`
}

// HealthCheck must pass before a build saves its template.
type HealthCheck struct {
	Cmd         string `json:"cmd"`
	TimeoutSec  int    `json:"timeout_sec,omitempty"`
	IntervalSec int    `json:"interval_sec,omitempty"`
}

// Build is a template build.
type Build struct {
	ID         string     `json:"id"`
	Name       string     `json:"name"`
	Status     string     `json:"status"` // queued, running, succeeded, failed, cancelled
	Error      string     `json:"error"`
	SandboxID  *string    `json:"sandbox_id"`
	CreatedAt  time.Time  `json:"created_at"`
	FinishedAt *time.Time `json:"finished_at"`
	Logs       string     `json:"logs"`
	LogsSize   int        `json:"logs_size"`
}

// Done reports whether the build has ended.
func (b Build) Done() bool {
	return b.Status == "succeeded" || b.Status == "failed" || b.Status == "cancelled"
}

// StartBuild queues a template build.
func (c *Client) StartBuild(ctx context.Context, r Recipe) (Build, error) {
	var out Build
	err := c.do(ctx, http.MethodPost, "/v1/builds", r, &out)
	return out, err
}

// GetBuild returns a build with its log from byte logsFrom on.
func (c *Client) GetBuild(ctx context.Context, id string, logsFrom int) (Build, error) {
	var out Build
	err := c.do(ctx, http.MethodGet, fmt.Sprintf("/v1/builds/%s?logs_from=%d", url.PathEscape(id), logsFrom), nil, &out)
	return out, err
}

// CancelBuild stops a queued or running build.
func (c *Client) CancelBuild(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/builds/"+url.PathEscape(id)+"/cancel", nil, nil)
}

// WaitBuild follows a build to its end, passing new log text to logs
// (may be nil) as it appears.
func (c *Client) WaitBuild(ctx context.Context, id string, logs func(string)) (Build, error) {
	from := 0
	for {
		b, err := c.GetBuild(ctx, id, from)
		if err != nil {
			return b, err
		}
		if logs != nil && b.Logs != "" {
			logs(b.Logs)
		}
		from = b.LogsSize
		if b.Done() {
			return b, nil
		}
		select {
		case <-ctx.Done():
			return b, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
