package metrics

import (
	"context"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/procfs"
)

// Target is a running sandbox to sample.
type Target struct {
	ID       string
	PID      int
	VCPUs    int
	DiskFile string
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/<pid>/stat's
// CPU times (100 on every Linux this runs on).
const clockTicks = 100

// Sampler keeps a Series per running sandbox. A sandbox that stops
// running (paused, destroyed) loses its series: the control plane keeps
// the history.
type Sampler struct {
	// Targets lists the sandboxes running now.
	Targets func() []Target

	mu     sync.Mutex
	series map[string]*tracked
}

type tracked struct {
	series   *Series
	pid      int
	lastCPU  int64
	lastTime time.Time
}

// Run samples every Interval until ctx ends.
func (s *Sampler) Run(ctx context.Context) {
	t := time.NewTicker(Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			s.Sample(now)
		}
	}
}

// Sample takes one sample of every target.
func (s *Sampler) Sample(now time.Time) {
	targets := s.Targets()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.series == nil {
		s.series = map[string]*tracked{}
	}
	seen := make(map[string]bool, len(targets))
	for _, tg := range targets {
		seen[tg.ID] = true
		tr := s.series[tg.ID]
		if tr == nil || tr.pid != tg.PID { // new, or a new VMM after a resume
			tr = &tracked{series: NewSeries(), pid: tg.PID, lastCPU: -1}
			s.series[tg.ID] = tr
		}
		ticks := procfs.CPUTicks(tg.PID)
		var pct float64
		if tr.lastCPU >= 0 && tg.VCPUs > 0 {
			if secs := now.Sub(tr.lastTime).Seconds(); secs > 0 {
				pct = min(100, max(0, float64(ticks-tr.lastCPU)/clockTicks/secs/float64(tg.VCPUs)*100))
			}
		}
		tr.lastCPU, tr.lastTime = ticks, now
		tr.series.Add(Point{At: now, CPUPct: pct, MemBytes: procfs.RSS(tg.PID), DiskBytes: allocated(tg.DiskFile)})
	}
	for id := range s.series {
		if !seen[id] {
			delete(s.series, id)
		}
	}
}

// Series returns a sandbox's series (nil before its first sample).
func (s *Sampler) Series(id string) *Series {
	s.mu.Lock()
	defer s.mu.Unlock()
	if tr := s.series[id]; tr != nil {
		return tr.series
	}
	return nil
}

// allocated is how many bytes a (sparse) file takes on disk.
func allocated(path string) int64 {
	if path == "" {
		return 0
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
