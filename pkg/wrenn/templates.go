package wrenn

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
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

// Recipe describes a template build. Give Recipe (upstream Wrenn's
// instruction lines: RUN [--timeout=d], START, ENV, WORKDIR, USER, COPY)
// or Commands (shell commands), not both.
type Recipe struct {
	Name         string            `json:"name"`
	BaseTemplate string            `json:"base_template,omitempty"`
	Recipe       []string          `json:"recipe,omitempty"`
	Commands     []string          `json:"commands,omitempty"`
	Envs         map[string]string `json:"envs,omitempty"`
	User         string            `json:"user,omitempty"`
	// StepTimeoutSec bounds each step without its own --timeout.
	StepTimeoutSec int `json:"step_timeout_sec,omitempty"`
	// HealthCheck is a *HealthCheck or upstream's string form
	// ("[--interval=3s] [--timeout=10s] [--start-period=0s] [--retries=0] cmd").
	HealthCheck any `json:"healthcheck,omitempty"`
	VCPUs       int `json:"vcpus,omitempty"`
	MemoryMB    int `json:"memory_mb,omitempty"`
	DiskSizeMB  int `json:"disk_size_mb,omitempty"`
	// SkipPrePost skips the platform's pre- and post-build phases around
	// Recipe lines.
	SkipPrePost bool `json:"skip_pre_post,omitempty"`
}

// HealthCheck must pass before a build saves its template.
type HealthCheck struct {
	Cmd         string `json:"cmd"`
	TimeoutSec  int    `json:"timeout_sec,omitempty"`
	IntervalSec int    `json:"interval_sec,omitempty"`
}

// BuildStep is one step's entry in a build's log.
type BuildStep struct {
	Step      int    `json:"step"`
	Phase     string `json:"phase"` // pre-build, recipe, post-build
	Cmd       string `json:"cmd"`
	Stdout    string `json:"stdout"`
	Stderr    string `json:"stderr"`
	Exit      int32  `json:"exit"`
	Ok        bool   `json:"ok"`
	ElapsedMs int64  `json:"elapsed_ms"`
}

// Build is a template build.
type Build struct {
	ID           string            `json:"id"`
	Name         string            `json:"name"`
	BaseTemplate string            `json:"base_template"`
	Recipe       []string          `json:"recipe"`
	Status       string            `json:"status"` // pending, running, success, failed, cancelled
	Error        string            `json:"error"`
	SandboxID    *string           `json:"sandbox_id"`
	CurrentStep  int               `json:"current_step"`
	TotalSteps   int               `json:"total_steps"`
	Steps        []BuildStep       `json:"logs"`
	DefaultUser  string            `json:"default_user"`
	DefaultEnv   map[string]string `json:"default_env"`
	CreatedAt    time.Time         `json:"created_at"`
	CompletedAt  *time.Time        `json:"completed_at"`
	// Output is the build's text output from the offset asked for, of
	// OutputSize bytes in all.
	Output     string `json:"output"`
	OutputSize int    `json:"output_size"`
}

// Done reports whether the build has ended.
func (b Build) Done() bool {
	return b.Status == "success" || b.Status == "failed" || b.Status == "cancelled"
}

// StartBuild queues a template build.
func (c *Client) StartBuild(ctx context.Context, r Recipe) (Build, error) {
	var out Build
	err := c.do(ctx, http.MethodPost, "/v1/builds", r, &out)
	return out, err
}

// StartBuildJSON queues a build from a recipe document as it is (either
// form), with archive (nil: none; tar, tar.gz or zip, named archiveName)
// holding the files its COPY steps read.
func (c *Client) StartBuildJSON(ctx context.Context, recipe []byte, archive io.Reader, archiveName string) (Build, error) {
	var out Build
	if archive == nil {
		err := c.do(ctx, http.MethodPost, "/v1/builds", json.RawMessage(recipe), &out)
		return out, err
	}
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := mw.WriteField("config", string(recipe))
		if err == nil {
			var part io.Writer
			if part, err = mw.CreateFormFile("archive", archiveName); err == nil {
				if _, err = io.Copy(part, archive); err == nil {
					err = mw.Close()
				}
			}
		}
		pw.CloseWithError(err)
	}()
	req, err := c.newRequest(ctx, http.MethodPost, "/v1/builds", pr)
	if err != nil {
		pr.Close()
		return out, err
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := c.http.Do(req)
	if err != nil {
		return out, fmt.Errorf("wrenn: POST /v1/builds: %w", err)
	}
	defer resp.Body.Close()
	if err := checkResponse(resp); err != nil {
		return out, err
	}
	return out, json.NewDecoder(resp.Body).Decode(&out)
}

// GetBuild returns a build with its text output from byte outputFrom on.
func (c *Client) GetBuild(ctx context.Context, id string, outputFrom int) (Build, error) {
	var out Build
	err := c.do(ctx, http.MethodGet, fmt.Sprintf("/v1/builds/%s?output_from=%d", url.PathEscape(id), outputFrom), nil, &out)
	return out, err
}

// CancelBuild stops a pending or running build.
func (c *Client) CancelBuild(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/builds/"+url.PathEscape(id)+"/cancel", nil, nil)
}

// WaitBuild follows a build to its end, passing new output to logs
// (may be nil) as it appears.
func (c *Client) WaitBuild(ctx context.Context, id string, logs func(string)) (Build, error) {
	from := 0
	for {
		b, err := c.GetBuild(ctx, id, from)
		if err != nil {
			return b, err
		}
		if logs != nil && b.Output != "" {
			logs(b.Output)
		}
		from = b.OutputSize
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
