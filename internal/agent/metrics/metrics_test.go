package metrics

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Samples roll up the tiers: every 60 fine points make a medium one (their
// average), every 10 medium points a coarse one; each ring keeps its last.
func TestTiersRollUp(t *testing.T) {
	s := NewSeries()
	start := time.Unix(1_700_000_000, 0)
	n := mediumEvery*coarseEvery*2 + 30 // 1230 samples
	for i := range n {
		s.Add(Point{At: start.Add(time.Duration(i) * Interval), CPUPct: float64(i % 2 * 100), MemBytes: int64(i), DiskBytes: int64(i)})
	}
	fine, medium, coarse := s.Points(Fine), s.Points(Medium), s.Points(Coarse)
	if len(fine) != fineCap || fine[len(fine)-1].MemBytes != int64(n-1) || fine[0].MemBytes != int64(n-fineCap) {
		t.Fatalf("fine: %d points, %v .. %v", len(fine), fine[0], fine[len(fine)-1])
	}
	if len(medium) != n/mediumEvery || medium[0].CPUPct != 50 || medium[0].MemBytes != 29 || medium[0].DiskBytes != 59 ||
		!medium[0].At.Equal(start.Add(59*Interval)) {
		t.Fatalf("medium: %d points, first %+v", len(medium), medium[0])
	}
	if len(coarse) != 2 || coarse[1].At.Before(coarse[0].At) {
		t.Fatalf("coarse: %+v", coarse)
	}
	if last, ok := s.Last(); !ok || last.MemBytes != int64(n-1) {
		t.Fatalf("last: %+v", last)
	}
}

// The sampler reads a real process (this test's) and forgets targets that
// stop running, and a target whose VMM changed starts afresh.
func TestSamplerReadsProcesses(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	targets := []Target{{ID: "sb-1", PID: os.Getpid(), VCPUs: 1, DiskFile: disk}}
	s := &Sampler{Targets: func() []Target { return targets }}
	now := time.Now()
	s.Sample(now)
	for deadline := time.Now().Add(100 * time.Millisecond); time.Now().Before(deadline); {
	} // some CPU time to measure
	s.Sample(now.Add(Interval))
	pts := s.Series("sb-1").Points(Fine)
	if len(pts) != 2 || pts[1].MemBytes <= 0 || pts[1].DiskBytes < 1<<20 || pts[1].CPUPct <= 0 || pts[1].CPUPct > 100 {
		t.Fatalf("points: %+v", pts)
	}
	targets[0].PID = os.Getppid()
	s.Sample(now.Add(2 * Interval))
	if pts := s.Series("sb-1").Points(Fine); len(pts) != 1 || pts[0].CPUPct != 0 {
		t.Fatalf("after a new VMM: %+v", pts)
	}
	targets = nil
	s.Sample(now.Add(3 * Interval))
	if s.Series("sb-1") != nil {
		t.Fatal("a sandbox no longer running kept its series")
	}
}
