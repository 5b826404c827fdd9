// Package builder runs template builds: it starts a capsule from the
// recipe's base template, runs the recipe's commands in it with their
// output kept as the build log, waits for the health check, and saves the
// capsule's disk as a new template on its host.
package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/recipe"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v1"
)

// Capsules are the capsule operations a build borrows from the API.
type Capsules interface {
	StartCapsule(ctx context.Context, teamID, userID, template string, vcpus, memoryMB, diskMB int, envs, metadata map[string]string) (store.Sandbox, error)
	DestroyCapsule(ctx context.Context, sb store.Sandbox) error
	AgentFor(ctx context.Context, hostID string) (agentclient.Client, error)
}

// Builder claims queued builds and runs them, one at a time per replica.
type Builder struct {
	Store    *store.Store
	Capsules Capsules
	Log      *slog.Logger
	// Interval between looks for queued builds (default 2 s).
	Interval time.Duration
	// StaleAfter is how long a running build may stay silent before it is
	// taken for dead (default 5 min; running builds touch it every 5 s).
	StaleAfter time.Duration
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

// Pass fails builds whose replica died, then runs queued builds until
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

// run carries one claimed build to its end: succeeded, failed or cancelled.
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
	status, reason := "succeeded", ""
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
	for i, cmd := range r.Commands {
		logf("\n$ %s\n", cmd)
		code, err := b.command(ctx, c, sb.ID, r, cmd, logf)
		if err != nil {
			return "", fmt.Errorf("command %d: %w", i+1, err)
		}
		if code != 0 {
			return "", fmt.Errorf("command %d exited with code %d", i+1, code)
		}
	}
	if h := r.HealthCheck; h != nil {
		if err := b.healthCheck(ctx, c, sb.ID, r, logf); err != nil {
			return "", err
		}
	}
	if cause := context.Cause(ctx); cause != nil {
		return "", cause
	}
	// A recipe with a health check describes something running: the
	// template keeps its memory, so sandboxes made from it start with it
	// running (E2B's start and ready commands).
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
		Metadata: map[string]string{"build_id": bd.ID, "base_template": r.BaseTemplate}}
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

// command runs one recipe command, streaming its output into the log.
func (b *Builder) command(ctx context.Context, c agentclient.Client, sandboxID string, r recipe.Recipe, cmd string, logf func(string, ...any)) (int32, error) {
	tag := "build-" + strings.ToLower(ids.Random(8))
	stream, err := c.ExecStream(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sandboxID, Cmd: "/bin/sh", Args: []string{"-c", cmd},
		Env: r.Envs, User: r.User, TimeoutSeconds: int32(r.StepTimeoutSec), Tag: tag}))
	if err != nil {
		return 0, err
	}
	defer stream.Close()
	for stream.Receive() {
		switch e := stream.Msg().GetEvent().(type) {
		case *pb.ExecStreamResponse_Stdout:
			logf("%s", e.Stdout)
		case *pb.ExecStreamResponse_Stderr:
			logf("%s", e.Stderr)
		case *pb.ExecStreamResponse_ExitCode:
			return e.ExitCode, nil
		}
	}
	if ctx.Err() != nil {
		// Cancelled: stop the command too (the agent keeps it otherwise).
		_, _ = c.KillProcess(context.WithoutCancel(ctx), connect.NewRequest(&pb.KillProcessRequest{Process: &pb.ProcessRef{SandboxId: sandboxID, Tag: tag}, Force: true}))
		return 0, context.Cause(ctx)
	}
	if err := stream.Err(); err != nil {
		if connect.CodeOf(err) == connect.CodeDeadlineExceeded {
			return 0, fmt.Errorf("no result within step_timeout_sec (%d s)", r.StepTimeoutSec)
		}
		return 0, err
	}
	return 0, errors.New("the command's output ended without an exit code")
}

// healthCheck runs the check until it passes or its time is up.
func (b *Builder) healthCheck(ctx context.Context, c agentclient.Client, sandboxID string, r recipe.Recipe, logf func(string, ...any)) error {
	h := r.HealthCheck
	logf("\n== health check: %s (up to %d s)\n", h.Cmd, h.TimeoutSec)
	deadline := time.Now().Add(time.Duration(h.TimeoutSec) * time.Second)
	for attempt := 1; ; attempt++ {
		resp, err := c.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: sandboxID, Cmd: "/bin/sh", Args: []string{"-c", h.Cmd},
			Env: r.Envs, User: r.User, TimeoutSeconds: int32(max(1, h.IntervalSec))}))
		switch {
		case err != nil && ctx.Err() != nil:
			return context.Cause(ctx)
		case err != nil:
			logf("attempt %d: %v\n", attempt, err)
		case resp.Msg.GetExitCode() == 0:
			logf("attempt %d: passed\n", attempt)
			return nil
		default:
			logf("attempt %d: exit %d %s\n", attempt, resp.Msg.GetExitCode(), strings.TrimSpace(string(resp.Msg.GetStderr())))
		}
		if time.Now().Add(time.Duration(h.IntervalSec) * time.Second).After(deadline) {
			return fmt.Errorf("health check did not pass within %d s", h.TimeoutSec)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(time.Duration(h.IntervalSec) * time.Second):
		}
	}
}
