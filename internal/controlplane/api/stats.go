package api

import (
	"math"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// statsRanges maps /v1/capsules/stats?range= to its window and step.
var statsRanges = map[string]struct{ window, step time.Duration }{
	"5m":  {5 * time.Minute, 10 * time.Second},
	"1h":  {time.Hour, time.Minute},
	"6h":  {6 * time.Hour, 5 * time.Minute},
	"24h": {24 * time.Hour, 15 * time.Minute},
	"30d": {30 * 24 * time.Hour, 6 * time.Hour},
}

func (s *Server) capsuleStats(w http.ResponseWriter, r *http.Request, p *principal) error {
	name := r.URL.Query().Get("range")
	if name == "" {
		name = "1h"
	}
	rg, ok := statsRanges[name]
	if !ok {
		return badRequest("range must be one of 5m, 1h, 6h, 24h, 30d")
	}
	ctx := r.Context()
	now := time.Now().UTC()
	running, vcpus, mem, err := s.st.TeamUsage(ctx, p.TeamID)
	if err != nil {
		return err
	}
	peaks, err := s.st.StatsPeaks(ctx, p.TeamID, now.Add(-30*24*time.Hour))
	if err != nil {
		return err
	}
	series, err := s.st.StatsSeries(ctx, p.TeamID, now.Add(-rg.window), rg.step)
	if err != nil {
		return err
	}
	labels := make([]string, 0, len(series))
	runs, cpus, mems := make([]int64, 0, len(series)), make([]int64, 0, len(series)), make([]int64, 0, len(series))
	for _, pt := range series {
		labels = append(labels, pt.At.UTC().Format(time.RFC3339))
		runs, cpus, mems = append(runs, pt.Running), append(cpus, pt.VCPUs), append(mems, pt.MemoryMB)
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"range":   name,
		"current": map[string]any{"running_count": running, "vcpus_reserved": vcpus, "memory_mb_reserved": mem, "sampled_at": now.Format(time.RFC3339)},
		"peaks":   map[string]any{"running_count": peaks.Running, "vcpus": peaks.VCPUs, "memory_mb": peaks.MemoryMB},
		"series":  map[string]any{"labels": labels, "running": runs, "vcpus": cpus, "memory_mb": mems},
	})
	return nil
}

func (s *Server) capsuleUsage(w http.ResponseWriter, r *http.Request, p *principal) error {
	today := time.Now().UTC().Truncate(24 * time.Hour)
	from, to := today.AddDate(0, 0, -30), today
	for name, dst := range map[string]*time.Time{"from": &from, "to": &to} {
		if v := r.URL.Query().Get(name); v != "" {
			d, err := time.Parse(time.DateOnly, v)
			if err != nil {
				return badRequest("%s must be a date like 2026-01-31", name)
			}
			*dst = d
		}
	}
	if to.Before(from) {
		return badRequest("from must not be after to")
	}
	if to.Sub(from) > 366*24*time.Hour {
		return badRequest("at most 366 days at once")
	}
	days, err := s.st.UsageByDay(r.Context(), p.TeamID, from.Format(time.DateOnly), to.Format(time.DateOnly))
	if err != nil {
		return err
	}
	points := make([]map[string]any, 0, len(days))
	for _, d := range days {
		points = append(points, map[string]any{"date": d.Day.UTC().Format(time.DateOnly), "cpu_minutes": d.CPUMinutes, "ram_mb_minutes": d.RAMMBMinutes})
	}
	writeJSON(w, http.StatusOK, map[string]any{"from": from.Format(time.DateOnly), "to": to.Format(time.DateOnly), "points": points})
	return nil
}

// metricRanges maps /v1/capsules/{id}/metrics?range= to its window and the
// width samples are averaged over (0: every sample).
// tier is the agent's ring of samples the range reads while the capsule
// runs (as upstream's: every 500 ms for 10 minutes, 30 s averages for 2
// hours, 5 min averages for a day).
var metricRanges = map[string]struct {
	window, bucket time.Duration
	tier           string
}{
	"5m":  {5 * time.Minute, 0, "10m"},
	"10m": {10 * time.Minute, 0, "10m"},
	"1h":  {time.Hour, 30 * time.Second, "2h"},
	"2h":  {2 * time.Hour, 30 * time.Second, "2h"},
	"6h":  {6 * time.Hour, 5 * time.Minute, "24h"},
	"12h": {12 * time.Hour, 5 * time.Minute, "24h"},
	"24h": {24 * time.Hour, 5 * time.Minute, "24h"},
}

func (s *Server) capsuleMetrics(w http.ResponseWriter, r *http.Request, p *principal) error {
	name := r.URL.Query().Get("range")
	if name == "" {
		name = "10m"
	}
	rg, ok := metricRanges[name]
	if !ok {
		return badRequest("range must be one of 5m, 10m, 1h, 2h, 6h, 12h, 24h")
	}
	sb, err := s.capsule(r, p)
	if err != nil {
		return err
	}
	if sb.Status == "stopped" || sb.Status == "error" || sb.Status == "missing" {
		return errf(http.StatusNotFound, "not_found", "capsule %s is %s; metrics are kept only for live capsules", sb.ID, sb.Status)
	}
	since := time.Now().Add(-rg.window)
	samples, err := s.st.Metrics(r.Context(), sb.ID, since, rg.bucket)
	if err != nil {
		return err
	}
	if sb.Status == "running" && sb.HostID != nil {
		// The host's own samples since the capsule last started, finer than
		// what the control plane keeps; the stored ones go before them, so
		// the series runs on across pauses.
		if fine := s.hostSamples(r, sb, rg.tier, since); len(fine) > 0 {
			kept := samples[:0]
			for _, m := range samples {
				if m.At.Before(fine[0].At) {
					kept = append(kept, m)
				}
			}
			samples = append(kept, fine...)
		} else if len(samples) == 0 {
			// Nothing sampled yet (a capsule younger than one reconcile pass): ask now.
			if live, ok := s.liveSample(r, sb); ok {
				samples = append(samples, live)
			}
		}
	}
	points := make([]map[string]any, 0, len(samples))
	for _, m := range samples {
		points = append(points, map[string]any{"timestamp_unix": m.At.Unix(), "timestamp_unix_ms": m.At.UnixMilli(), "cpu_pct": m.CPUPct, "mem_bytes": m.MemBytes, "disk_bytes": m.DiskBytes})
	}
	writeJSON(w, http.StatusOK, map[string]any{"sandbox_id": sb.ID, "range": name, "points": points})
	return nil
}

// hostSamples are the agent's samples of the capsule's VMM in a tier, from
// since on (none if the host cannot say).
func (s *Server) hostSamples(r *http.Request, sb store.Sandbox, tier string, since time.Time) []store.MetricSample {
	c, _, err := s.agentFor(r.Context(), *sb.HostID)
	if err != nil {
		return nil
	}
	m, err := c.GetSandboxMetrics(r.Context(), connect.NewRequest(&pb.GetSandboxMetricsRequest{Id: sb.ID, Range: tier}))
	if err != nil {
		return nil
	}
	var out []store.MetricSample
	for _, p := range m.Msg.GetPoints() {
		if at := time.UnixMilli(p.GetTimestampUnixMs()); !at.Before(since) && validPct(p.GetCpuPct()) {
			out = append(out, store.MetricSample{SandboxID: sb.ID, At: at, CPUPct: p.GetCpuPct(), MemBytes: p.GetMemBytes(), DiskBytes: p.GetDiskBytes()})
		}
	}
	return out
}

// validPct refuses CPU figures a broken host could send.
func validPct(p float64) bool { return !math.IsNaN(p) && !math.IsInf(p, 0) && p >= 0 && p <= 100 }

func (s *Server) liveSample(r *http.Request, sb store.Sandbox) (store.MetricSample, bool) {
	c, _, err := s.agentFor(r.Context(), *sb.HostID)
	if err != nil {
		return store.MetricSample{}, false
	}
	m, err := c.GetSandboxMetrics(r.Context(), connect.NewRequest(&pb.GetSandboxMetricsRequest{Id: sb.ID}))
	if err != nil {
		return store.MetricSample{}, false
	}
	if !validPct(m.Msg.GetCpuUsedPct()) {
		return store.MetricSample{}, false
	}
	return store.MetricSample{SandboxID: sb.ID, At: time.Now(), CPUPct: m.Msg.GetCpuUsedPct(),
		MemBytes: m.Msg.GetMemUsedBytes(), DiskBytes: m.Msg.GetDiskUsedBytes()}, true
}
