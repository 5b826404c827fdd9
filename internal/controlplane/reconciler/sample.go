package reconciler

import (
	"context"
	"math"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// sampleConcurrency bounds the metric calls in flight to one host.
const sampleConcurrency = 8

// sample reads the resource figures of a host's running capsules and
// stores them for /v1/capsules/{id}/metrics.
func (r *Reconciler) sample(ctx context.Context, c agentclient.Client, hostID string, ids []string) {
	if len(ids) == 0 {
		return
	}
	now := time.Now().UTC().Truncate(time.Second)
	var (
		mu      sync.Mutex
		samples []store.MetricSample
		wg      sync.WaitGroup
		slots   = make(chan struct{}, sampleConcurrency)
	)
	for _, id := range ids {
		wg.Add(1)
		slots <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			m, err := c.GetSandboxMetrics(mctx, connect.NewRequest(&pb.GetSandboxMetricsRequest{Id: id}))
			if err != nil {
				r.Log.Debug("metrics sample failed", "capsule", id, "host", hostID, "err", err)
				return
			}
			// The host's newest sample of the VMM, the figures the agent's
			// finer tiers hold too (as upstream's); the guest's own when the
			// host has none yet.
			sm := store.MetricSample{SandboxID: id, At: now, CPUPct: m.Msg.GetCpuUsedPct(), MemBytes: m.Msg.GetMemUsedBytes(), DiskBytes: m.Msg.GetDiskUsedBytes()}
			if pts := m.Msg.GetPoints(); len(pts) > 0 {
				last := pts[len(pts)-1]
				sm.CPUPct, sm.MemBytes, sm.DiskBytes = last.GetCpuPct(), last.GetMemBytes(), last.GetDiskBytes()
			}
			if pct := sm.CPUPct; math.IsNaN(pct) || math.IsInf(pct, 0) || pct < 0 || pct > 100 {
				r.Log.Warn("metrics sample refused: the host sent a CPU figure that is not a percentage", "capsule", id, "host", hostID)
				return
			}
			mu.Lock()
			samples = append(samples, sm)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if err := r.Store.RecordMetrics(ctx, samples); err != nil {
		r.Log.Warn("store metric samples", "host", hostID, "err", err)
	}
}
