// Package builder runs template builds: it starts a capsule from the
// recipe's base template, runs the recipe's steps in it (with the
// platform's pre- and post-build phases for upstream-form recipes), keeps
// their output as the build log and a log entry per step, waits for the
// health check, and saves the capsule as a new template on its host.
package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/recipe"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// Capsules are the capsule operations a build borrows from the API.
type Capsules interface {
	StartCapsule(ctx context.Context, teamID, userID, template string, vcpus, memoryMB, diskMB int, envs, metadata map[string]string) (store.Sandbox, error)
	DestroyCapsule(ctx context.Context, sb store.Sandbox) error
	AgentFor(ctx context.Context, hostID string) (agentclient.Client, error)
}

// Builder claims pending builds and runs them, one at a time per replica.
type Builder struct {
	Store    *store.Store
	Capsules Capsules
	Log      *slog.Logger
	// Interval between looks for pending builds (default 2 s).
	Interval time.Duration
	// StaleAfter is how long a running build may stay silent before it is
	// taken for dead (default 5 min; running builds touch it every 5 s).
	StaleAfter time.Duration
	// PreBuild and PostBuild replace the platform's phases around
	// upstream-form recipes (nil: PreBuild(), PostBuild()).
	PreBuild, PostBuild []string
}

// Run builds until ctx ends.
func (b *Builder) Run(ctx context.Context) {
	if b.Interval == 0 {
		b.Interval = 2 * time.Second
	}
	t := time.NewTicker(b.Interval)
	defer t.Stop()
	for {
		if err := b.Pass(ctx); err != nil && ctx.Err() == nil {
			b.Log.Error("build pass failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Pass fails builds whose replica died, then runs pending builds until
// none is left.
func (b *Builder) Pass(ctx context.Context) error {
	if b.StaleAfter == 0 {
		b.StaleAfter = 5 * time.Minute
	}
	stale, err := b.Store.StaleBuilds(ctx, b.StaleAfter)
	if err != nil {
		return err
	}
	for _, bd := range stale {
		b.Log.Warn("build abandoned by a control plane that stopped; failing it", "build", bd.ID)
		b.cleanup(ctx, bd)
		_ = b.Store.FinishBuild(ctx, bd.ID, "failed", "", "the control plane running this build stopped; submit it again")
	}
	for ctx.Err() == nil {
		bd, err := b.Store.ClaimBuild(ctx)
		if err != nil || bd == nil {
			return err
		}
		b.run(ctx, *bd)
	}
	return nil
}

// cleanup destroys an abandoned build's capsule.
func (b *Builder) cleanup(ctx context.Context, bd store.Build) {
	if bd.SandboxID == nil {
		return
	}
	sb, err := b.Store.Sandbox(ctx, "", *bd.SandboxID)
	if err == nil && sb.Status != "stopped" && sb.Status != "error" {
		_ = b.Capsules.DestroyCapsule(ctx, sb)
	}
}

// errCancelled ends a build someone cancelled.
var errCancelled = errors.New("cancelled")

// run carries one claimed build to its end: success, failed or cancelled.
func (b *Builder) run(parent context.Context, bd store.Build) {
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	log := b.Log.With("build", bd.ID, "template", bd.Name)
	// Keep the build visibly alive and notice cancellation between outputs.
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if stop, _ := b.Store.AppendBuildLog(ctx, bd.ID, ""); stop {
					cancel(errCancelled)
				}
			}
		}
	}()
	logf := func(format string, args ...any) {
		// Logs are text: binary output is kept readable, NULs dropped.
		text := strings.ReplaceAll(strings.ToValidUTF8(fmt.Sprintf(format, args...), "\uFFFD"), "\x00", "")
		if stop, err := b.Store.AppendBuildLog(context.WithoutCancel(ctx), bd.ID, text); err == nil && stop {
			cancel(errCancelled)
		}
	}
	start := time.Now()
	log.Info("build started")
	tplID, err := b.steps(ctx, bd, logf)
	status, reason := "success", ""
	switch {
	case errors.Is(context.Cause(ctx), errCancelled):
		status, reason = "cancelled", "cancelled"
		logf("== cancelled\n")
	case err != nil:
		status, reason = "failed", err.Error()
		logf("== failed: %s\n", reason)
	default:
		logf("== template %q is ready (%s)\n", bd.Name, time.Since(start).Round(time.Second))
	}
	if ferr := b.Store.FinishBuild(context.WithoutCancel(ctx), bd.ID, status, tplID, reason); ferr != nil {
		log.Error("record build result", "err", ferr)
	}
	log.Info("build finished", "status", status, "took", time.Since(start).Round(time.Millisecond), "reason", reason)
}

// steps does the work; it returns the new template's ID.
func (b *Builder) steps(ctx context.Context, bd store.Build, logf func(string, ...any)) (string, error) {
	r, err := recipe.Parse(bd.Recipe)
	if err != nil {
		return "", err
	}
	var pre, post []recipe.Step
	if r.PrePost {
		if pre, err = recipe.ParseSteps(b.preBuild()); err != nil {
			return "", fmt.Errorf("pre-build phase: %w", err)
		}
		if post, err = recipe.ParseSteps(b.postBuild()); err != nil {
			return "", fmt.Errorf("post-build phase: %w", err)
		}
	}
	var archive []byte
	if r.UsesArchive() {
		if archive, err = b.Store.BuildArchive(ctx, bd.ID); err != nil {
			return "", err
		}
		if archive == nil {
			return "", errors.New("the recipe has COPY steps but the build has no archive")
		}
	}
	if cause := context.Cause(ctx); cause != nil {
		return "", cause
	}
	creator := ""
	if bd.CreatedBy != nil {
		creator = *bd.CreatedBy
	}
	logf("== starting a capsule from %q (%d vCPU, %d MB)\n", r.BaseTemplate, r.VCPUs, r.MemoryMB)
	sb, err := b.Capsules.StartCapsule(ctx, bd.TeamID, creator, r.BaseTemplate, r.VCPUs, r.MemoryMB, r.DiskSizeMB, r.Envs, map[string]string{"wrenn.build": bd.ID})
	if sb.ID != "" {
		_ = b.Store.SetBuildSandbox(ctx, bd.ID, sb.ID)
		defer func() {
			if derr := b.Capsules.DestroyCapsule(context.WithoutCancel(ctx), sb); derr != nil {
				b.Log.Warn("destroy build capsule", "build", bd.ID, "capsule", sb.ID, "err", derr)
			}
		}()
	}
	if err != nil {
		return "", fmt.Errorf("start build capsule: %w", err)
	}
	logf("== capsule %s is running on %s\n", sb.ID, *sb.HostID)
	c, err := b.Capsules.AgentFor(ctx, *sb.HostID)
	if err != nil {
		return "", err
	}
	total := len(pre) + len(r.Steps) + len(post)
	s := &session{c: c, sandboxID: sb.ID, env: maps.Clone(r.Envs), user: r.User, timeout: r.StepTimeout, logf: logf,
		record: func(current int, entries []StepLog) {
			if err := b.Store.SetBuildSteps(context.WithoutCancel(ctx), bd.ID, current, total, encode(entries)); err != nil {
				b.Log.Warn("record build steps", "build", bd.ID, "err", err)
			}
		}}
	s.readBase(ctx)
	if archive != nil {
		if err := s.unpack(ctx, archive); err != nil {
			return "", err
		}
	}
	if err := s.runPhase(ctx, "pre-build", pre); err != nil {
		return "", err
	}
	if err := s.runPhase(ctx, "recipe", r.Steps); err != nil {
		return "", err
	}
	// The template keeps who the recipe ended as and what it set; the
	// post-build phase cleans up as root.
	defaultUser, defaultEnv := s.defaults()
	s.user = "root"
	if err := s.runPhase(ctx, "post-build", post); err != nil {
		return "", err
	}
	s.user = defaultUser
	if h := r.HealthCheck; h != nil {
		if err := s.healthCheck(ctx, h); err != nil {
			return "", err
		}
	}
	if cause := context.Cause(ctx); cause != nil {
		return "", cause
	}
	if err := b.Store.SetBuildDefaults(context.WithoutCancel(ctx), bd.ID, defaultUser, defaultEnv); err != nil {
		return "", err
	}
	// A recipe with a health check describes something running: the
	// template keeps its memory, so sandboxes made from it start with it
	// running (E2B's start and ready commands, upstream's START).
	withMemory := r.HealthCheck != nil
	if withMemory {
		logf("\n== saving the memory and disk as template %q\n", bd.Name)
	} else {
		logf("\n== saving the disk as template %q\n", bd.Name)
	}
	id := ids.New("tpl")
	resp, err := c.FlattenRootfs(ctx, connect.NewRequest(&pb.FlattenRootfsRequest{SandboxId: sb.ID, Name: id, WithMemory: withMemory}))
	if err != nil {
		return "", fmt.Errorf("save template: %w", err)
	}
	t := store.Template{ID: id, Name: bd.Name, Type: "base", VCPUs: ptr(int32(r.VCPUs)), MemoryMB: ptr(int32(r.MemoryMB)),
		SizeBytes: resp.Msg.GetTemplate().GetSizeBytes(), MemoryBytes: resp.Msg.GetTemplate().GetMemory().GetSizeBytes(), HostID: sb.HostID, SourceSandboxID: &sb.ID,
		Metadata: map[string]string{"build_id": bd.ID, "base_template": r.BaseTemplate}, DefaultUser: defaultUser, DefaultEnv: defaultEnv}
	if !bd.Platform {
		t.TeamID = &bd.TeamID
	}
	if _, err := b.Store.InsertTemplate(context.WithoutCancel(ctx), t); err != nil {
		// No record, no files: remove what the host saved.
		_, _ = c.DeleteSnapshot(context.WithoutCancel(ctx), connect.NewRequest(&pb.DeleteSnapshotRequest{Name: id}))
		if errors.Is(err, store.ErrConflict) {
			return "", fmt.Errorf("a template named %q was created while this build ran", bd.Name)
		}
		return "", err
	}
	logf("== %d MB saved on host %s\n", resp.Msg.GetTemplate().GetSizeBytes()>>20, *sb.HostID)
	return id, nil
}

func ptr[T any](v T) *T { return &v }

func (b *Builder) preBuild() []string {
	if b.PreBuild != nil {
		return b.PreBuild
	}
	return PreBuild()
}

func (b *Builder) postBuild() []string {
	if b.PostBuild != nil {
		return b.PostBuild
	}
	return PostBuild()
}
