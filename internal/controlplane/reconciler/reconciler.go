// Package reconciler runs the control plane's background jobs: it marks
// silent hosts unreachable, enforces capsule timeouts, finishes work a
// replica left half done, makes the database agree with each host and
// samples running capsules' resource use.
// A pass runs under a PostgreSQL advisory lock, so with several replicas
// it runs on one of them at a time. Every call to an agent has a deadline,
// hosts are looked at concurrently, and the capsule operations a pass
// decides (timeout pauses, destroys) run after the lock is released, at
// most Concurrency at once: one hung host delays its own capsules, never
// host-down detection, other hosts, or another replica taking over.
package reconciler

import (
	"cmp"
	"context"
	"log/slog"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/hostaddr"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/safetext"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// Actions are the capsule operations jobs reuse from the API.
type Actions interface {
	// PauseExpired pauses a capsule if it is still past its timeout as
	// the pause begins, and reports whether it began.
	PauseExpired(ctx context.Context, sb store.Sandbox) (bool, error)
	DestroyStopping(ctx context.Context, id, hostID string) error
}

// Reconciler holds the jobs' settings.
type Reconciler struct {
	Store   *store.Store
	Agents  *agentclient.Pool
	Actions Actions
	Log     *slog.Logger
	// Interval between passes (default 10 s).
	Interval time.Duration
	// HostSilence after which an online host is unreachable (default 90 s: three missed heartbeats).
	HostSilence time.Duration
	// StuckAfter is how long a transitional state may last before it is settled (default 5 min).
	StuckAfter time.Duration
	// HostAddresses says which host addresses may be dialled; a host at
	// any other (registered before the rules, or the rules narrowed) is
	// left alone.
	HostAddresses hostaddr.Policy
	// Concurrency bounds the capsule operations in flight (default 16),
	// PerHost those on one host (default 4): a slow host's operations wait
	// for its own slots, not everyone's.
	Concurrency, PerHost int
	// AccountGrace is how long a deleted account is kept before it is
	// purged (default 15 days, as upstream).
	AccountGrace time.Duration
	// DeadlineInterval is how often capsules past their timeout are
	// looked for between passes (default 1 s): E2B's SDKs expect a
	// sandbox to end about when its timeout says.
	DeadlineInterval time.Duration

	mu        sync.Mutex
	inflight  map[string]bool // capsules with an operation running
	slots     chan struct{}
	hostSlots map[string]chan struct{}
	work      sync.WaitGroup
}

// lockKey is the advisory lock of the reconciler's pass, deadlineKey
// that of the deadline checks between passes.
const (
	lockKey     = 0x77726e6e00000010
	deadlineKey = 0x77726e6e00000011
)

// Run runs passes until ctx ends.
func (r *Reconciler) Run(ctx context.Context) {
	if r.Interval == 0 {
		r.Interval = 10 * time.Second
	}
	t := time.NewTicker(r.Interval)
	defer t.Stop()
	go r.watchDeadlines(ctx)
	for {
		if _, err := r.pass(ctx); err != nil && ctx.Err() == nil {
			r.Log.Error("reconcile pass failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Pass runs every job once if no other replica is running them, and
// waits for the capsule operations it started; it reports whether it ran.
func (r *Reconciler) Pass(ctx context.Context) (bool, error) {
	ran, err := r.pass(ctx)
	r.work.Wait()
	return ran, err
}

// pass is Pass without the wait: Run goes on with its next pass while an
// operation on a slow host is still running.
func (r *Reconciler) pass(ctx context.Context) (bool, error) {
	if r.HostSilence == 0 {
		r.HostSilence = 90 * time.Second
	}
	if r.StuckAfter == 0 {
		r.StuckAfter = 5 * time.Minute
	}
	var expired, stopping []store.Sandbox
	ran, err := r.Store.TryLock(ctx, lockKey, func(ctx context.Context) error {
		down, err := r.Store.MarkUnreachable(ctx, r.HostSilence)
		if err != nil {
			return err
		}
		for _, id := range down {
			r.Log.Warn("host missed its heartbeats: unreachable, no new capsules go there", "host", id)
			r.audit(ctx, id, "host.down")
		}
		if expired, err = r.Store.Expired(ctx); err != nil {
			r.Log.Error("list expired capsules", "err", err)
		}
		if stopping, err = r.Store.Sandboxes(ctx, store.SandboxFilter{Statuses: []string{"stopping"}}); err != nil {
			r.Log.Error("list capsules being destroyed", "err", err)
		}
		r.settleStuck(ctx)
		r.compareHosts(ctx)
		if err := r.Store.Prune(ctx); err != nil {
			r.Log.Warn("prune old samples and events", "err", err)
		}
		r.purgeAccounts(ctx)
		return nil
	})
	if !ran || err != nil {
		return ran, err
	}
	// Two replicas may both decide an operation (one pass each): the
	// state transitions it starts with let only one of them through.
	for _, sb := range expired {
		r.dispatch(ctx, sb, func(ctx context.Context) { r.expire(ctx, sb) })
	}
	for _, sb := range stopping {
		r.dispatch(ctx, sb, func(ctx context.Context) { r.finishStopping(ctx, sb) })
	}
	return true, nil
}

// dispatch runs job for capsule sb unless one already runs for it,
// waiting first for one of its host's PerHost slots, then for one of the
// Concurrency slots.
func (r *Reconciler) dispatch(ctx context.Context, sb store.Sandbox, job func(context.Context)) {
	host := ""
	if sb.HostID != nil {
		host = *sb.HostID
	}
	r.mu.Lock()
	if r.inflight == nil {
		r.inflight, r.hostSlots = map[string]bool{}, map[string]chan struct{}{}
		r.slots = make(chan struct{}, cmp.Or(r.Concurrency, 16))
	}
	if r.inflight[sb.ID] {
		r.mu.Unlock()
		return
	}
	r.inflight[sb.ID] = true
	slots, mine := r.slots, r.hostSlots[host]
	if mine == nil {
		mine = make(chan struct{}, cmp.Or(r.PerHost, 4))
		r.hostSlots[host] = mine
	}
	r.mu.Unlock()
	r.work.Add(1)
	go func() {
		defer r.work.Done()
		defer func() {
			r.mu.Lock()
			delete(r.inflight, sb.ID)
			r.mu.Unlock()
		}()
		for _, s := range []chan struct{}{mine, slots} {
			select {
			case s <- struct{}{}:
				defer func() { <-s }()
			case <-ctx.Done():
				return
			}
		}
		job(ctx)
	}()
}

func (r *Reconciler) audit(ctx context.Context, hostID, action string) {
	_ = r.Store.Audit(ctx, store.AuditEntry{ID: ids.New("aud"),
		ActorType: "system", ActorID: "reconciler", ResourceType: "host", ResourceID: hostID, Action: action, Status: "success"})
}

// watchDeadlines ends capsules past their timeout within a second or so,
// between passes, until ctx ends.
func (r *Reconciler) watchDeadlines(ctx context.Context) {
	t := time.NewTicker(cmp.Or(r.DeadlineInterval, time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var expired []store.Sandbox
		_, err := r.Store.TryLock(ctx, deadlineKey, func(ctx context.Context) (err error) {
			expired, err = r.Store.Expired(ctx)
			return err
		})
		if err != nil && ctx.Err() == nil {
			r.Log.Warn("list capsules past their timeout", "err", err)
		}
		for _, sb := range expired {
			r.dispatch(ctx, sb, func(ctx context.Context) { r.expire(ctx, sb) })
		}
	}
}

// expire pauses (or destroys) a capsule idle past its timeout, also one
// whose host was down when the time came.
func (r *Reconciler) expire(ctx context.Context, sb store.Sandbox) {
	// The listing is from the pass; the job may run later.
	if still, err := r.Store.StillExpired(ctx, sb.ID); err != nil || !still {
		return
	}
	if sb.AutoPause {
		began, err := r.Actions.PauseExpired(ctx, sb)
		if err != nil {
			r.Log.Warn("timeout: pause failed; will retry", "capsule", sb.ID, "err", err)
			return
		}
		if began {
			r.Log.Info("timeout: capsule paused", "capsule", sb.ID, "timeout_sec", sb.TimeoutSec)
		}
		return
	}
	if stopped, err := r.Store.StopExpired(ctx, sb.ID); err != nil || !stopped {
		return
	}
	r.Log.Info("timeout: destroying capsule", "capsule", sb.ID, "timeout_sec", sb.TimeoutSec)
	if sb.HostID != nil {
		_ = r.Actions.DestroyStopping(ctx, sb.ID, *sb.HostID)
	}
}

// finishStopping retries a destroy that could not reach its host.
func (r *Reconciler) finishStopping(ctx context.Context, sb store.Sandbox) {
	if sb.HostID == nil {
		_, _ = r.Store.Transition(ctx, sb.ID, []string{"stopping"}, "stopped", map[string]any{"stopped_at": store.Now})
		return
	}
	if err := r.Actions.DestroyStopping(ctx, sb.ID, *sb.HostID); err != nil {
		r.Log.Debug("destroy still waiting for its host", "capsule", sb.ID, "err", err)
	}
}

// settleStuck resolves capsules left starting, pausing or resuming by a
// replica that died: the host says what they really are.
func (r *Reconciler) settleStuck(ctx context.Context) {
	sbs, err := r.Store.Stuck(ctx, r.StuckAfter)
	if err != nil {
		return
	}
	for _, sb := range sbs {
		if sb.Status == "stopping" || sb.HostID == nil {
			continue
		}
		c, ok := r.client(ctx, *sb.HostID)
		if !ok {
			continue
		}
		gctx, cancel := context.WithTimeout(ctx, hostCall)
		resp, err := c.GetSandbox(gctx, connect.NewRequest(&pb.GetSandboxRequest{Id: sb.ID}))
		cancel()
		to, reason := "", ""
		switch {
		case connect.CodeOf(err) == connect.CodeNotFound:
			to, reason = "error", "the control plane stopped during "+sb.Status+" and the host has no such capsule"
		case err != nil:
			continue
		default:
			to = agentclient.Status(resp.Msg.GetSandbox().GetState())
		}
		if to == "" || to == sb.Status || to == "starting" {
			continue // nothing to settle yet; a host still starting it is looked at next pass
		}
		set := map[string]any{}
		if reason != "" {
			set["error"], set["stopped_at"] = reason, store.Now
		}
		if to == "running" && sb.StartedAt == nil {
			set["started_at"], set["host_ip"], set["guest_ip"] = store.Now, resp.Msg.GetSandbox().GetAddress(), "169.254.0.21"
		}
		if _, err := r.Store.Transition(ctx, sb.ID, []string{sb.Status}, to, set); err == nil {
			r.Log.Warn("settled a capsule left in a transitional state", "capsule", sb.ID, "from", sb.Status, "to", to)
		}
	}
}

// compareHosts fixes drift between the database and each online host:
// capsules the host lost are marked missing, capsules the host paused on
// its own are marked paused, and VMs no record owns are destroyed.
func (r *Reconciler) compareHosts(ctx context.Context) {
	hosts, err := r.Store.Hosts(ctx, "")
	if err != nil {
		return
	}
	pooled, err := r.Store.WarmPoolTemplates(ctx)
	if err != nil {
		r.Log.Warn("list warm pool settings", "err", err)
	}
	var wg sync.WaitGroup
	for _, h := range hosts {
		if h.Status != "online" || h.Address == nil || h.AgentToken == nil || r.HostAddresses.Check(h.Type, *h.Address) != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.compareHost(ctx, h, pooled)
		}()
	}
	wg.Wait()
}

// hostCall bounds each call the reconciler makes to an agent while it
// holds its lock.
const hostCall = 15 * time.Second

// compareHost is compareHosts for one host.
func (r *Reconciler) compareHost(ctx context.Context, h store.Host, pooled []store.Template) {
	c := r.Agents.Get(h.ID, *h.Address, *h.AgentToken)
	lctx, cancel := context.WithTimeout(ctx, hostCall)
	resp, err := c.ListSandboxes(lctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	cancel()
	if err != nil {
		r.Log.Warn("list capsules on host", "host", h.ID, "err", agentclient.Message(err), "code", connect.CodeOf(err))
		return
	}
	onHost := map[string]*pb.Sandbox{}
	for _, sb := range resp.Msg.GetSandboxes() {
		onHost[sb.GetId()] = sb
	}
	recorded, err := r.Store.Sandboxes(ctx, store.SandboxFilter{HostID: h.ID})
	if err != nil {
		return
	}
	known := map[string]bool{}
	var running []string
	for _, sb := range recorded {
		known[sb.ID] = true
		a, present := onHost[sb.ID]
		if present && sb.Status == "running" && agentclient.Status(a.GetState()) == "running" {
			running = append(running, sb.ID)
		}
		switch {
		case sb.Status == "running" || sb.Status == "paused":
			if !present {
				r.Log.Warn("drift: capsule missing on its host", "capsule", sb.ID, "host", h.ID, "was", sb.Status)
				_, _ = r.Store.Transition(ctx, sb.ID, []string{sb.Status}, "missing", map[string]any{"error": "the host no longer has this capsule"})
				continue
			}
			if agentclient.Status(a.GetState()) == "error" {
				reason := "the host reports the capsule failed: " + safetext.Clip(a.GetError(), 512)
				r.Log.Error("capsule failed on its host", "capsule", sb.ID, "host", h.ID, "reason", reason)
				_, _ = r.Store.Transition(ctx, sb.ID, []string{sb.Status}, "error", map[string]any{"error": reason, "stopped_at": store.Now})
				continue
			}
			if got := agentclient.Status(a.GetState()); got != "" && got != sb.Status && (got == "running" || got == "paused") {
				r.Log.Info("drift: capsule state differs on host; following the host", "capsule", sb.ID, "db", sb.Status, "host_state", got)
				_, _ = r.Store.Transition(ctx, sb.ID, []string{sb.Status}, got, nil)
			}
		case (sb.Status == "stopped" || sb.Status == "error") && present:
			r.Log.Warn("drift: destroyed capsule still on its host; destroying", "capsule", sb.ID, "host", h.ID)
			r.destroyOn(ctx, c, sb.ID)
		}
	}
	for id := range onHost {
		if !known[id] {
			// Creates insert their record before calling the host, so a
			// VM without one was left by something else: remove it.
			r.Log.Warn("drift: capsule on host has no record; destroying", "capsule", id, "host", h.ID)
			r.destroyOn(ctx, c, id)
		}
	}
	r.sample(ctx, c, h.ID, running)
	r.syncPools(ctx, c, h.ID, pooled)
}

// destroyOn destroys a VM no record wants, within hostCall.
func (r *Reconciler) destroyOn(ctx context.Context, c agentclient.Client, id string) {
	dctx, cancel := context.WithTimeout(ctx, hostCall)
	defer cancel()
	_, _ = c.DestroySandbox(dctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id}))
}

// syncPools sends a host the warm pool settings of the templates it has
// and records what it reports of its pools.
func (r *Reconciler) syncPools(ctx context.Context, c agentclient.Client, hostID string, pooled []store.Template) {
	var want []*pb.WarmPool
	for _, t := range pooled {
		switch {
		case t.HostID == nil && t.Type == "base":
			want = append(want, &pb.WarmPool{Template: t.Name, Size: *t.WarmPoolSize}) // shipped with every host
		case t.HostID != nil && *t.HostID == hostID:
			want = append(want, &pb.WarmPool{Template: t.ID, Size: *t.WarmPoolSize}) // made there, named by id
		}
	}
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	res, err := c.SetWarmPools(sctx, connect.NewRequest(&pb.SetWarmPoolsRequest{Pools: want}))
	if err != nil {
		if connect.CodeOf(err) != connect.CodeUnimplemented { // an older agent has no pools
			r.Log.Warn("warm pools on host", "host", hostID, "err", agentclient.Message(err))
		}
		return
	}
	var got []store.WarmPool
	for _, p := range res.Msg.GetPools() {
		got = append(got, store.WarmPool{Template: p.GetPool().GetTemplate(), Size: int(p.GetPool().GetSize()), Ready: int(p.GetReady()),
			Starting: int(p.GetStarting()), VCPUs: int(p.GetPool().GetVcpus()), MemoryMiB: int(p.GetPool().GetMemoryMib()),
			DiskMiB: int(p.GetPool().GetDiskSizeMib()), Claims: p.GetClaims(), Misses: p.GetMisses(), Note: safetext.Clip(p.GetNote(), 512)})
	}
	if err := r.Store.SetWarmPools(ctx, hostID, got); err != nil {
		r.Log.Warn("record warm pools", "host", hostID, "err", err)
	}
}

func (r *Reconciler) client(ctx context.Context, hostID string) (agentclient.Client, bool) {
	h, err := r.Store.Host(ctx, hostID)
	if err != nil || h.Address == nil || h.AgentToken == nil || h.Status != "online" || r.HostAddresses.Check(h.Type, *h.Address) != nil {
		return nil, false
	}
	return r.Agents.Get(h.ID, *h.Address, *h.AgentToken), true
}

// purgeAccounts removes accounts deleted longer ago than AccountGrace.
func (r *Reconciler) purgeAccounts(ctx context.Context) {
	grace := r.AccountGrace
	if grace <= 0 {
		grace = 15 * 24 * time.Hour
	}
	n, err := r.Store.PurgeDeletedUsers(ctx, grace)
	if err != nil {
		r.Log.Warn("purge deleted accounts", "err", err)
	} else if n > 0 {
		r.Log.Info("purged deleted accounts past their grace period", "accounts", n, "grace", grace)
	}
}
