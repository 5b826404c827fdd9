// Package metrics reports the guest's CPU, memory and disk use for GET /metrics.
package metrics

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/procfs"
)

// Snapshot is the JSON body of GET /metrics (field names per the envd protocol).
type Snapshot struct {
	Timestamp  int64   `json:"ts"`
	CPUCount   int     `json:"cpu_count"`
	CPUUsedPct float64 `json:"cpu_used_pct"`
	MemTotal   uint64  `json:"mem_total"`
	MemUsed    uint64  `json:"mem_used"`
	DiskUsed   uint64  `json:"disk_used"`
	DiskTotal  uint64  `json:"disk_total"`
}

// Sampler computes CPU use between successive calls; the first call
// samples over a short window instead.
type Sampler struct {
	mu       sync.Mutex
	last     cpuTimes
	haveLast bool
	diskPath string
}

// NewSampler measures the file system that holds diskPath.
func NewSampler(diskPath string) *Sampler { return &Sampler{diskPath: diskPath} }

type cpuTimes struct{ busy, total uint64 }

// Read returns the current figures.
func (s *Sampler) Read() (Snapshot, error) {
	snap := Snapshot{Timestamp: time.Now().Unix(), CPUCount: runtime.NumCPU()}
	cpu, err := s.cpuPercent()
	if err != nil {
		return snap, err
	}
	snap.CPUUsedPct = cpu
	if snap.MemTotal, snap.MemUsed, err = memory(); err != nil {
		return snap, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.diskPath, &st); err != nil {
		return snap, fmt.Errorf("statfs %s: %w", s.diskPath, err)
	}
	snap.DiskTotal = st.Blocks * uint64(st.Bsize)
	snap.DiskUsed = (st.Blocks - st.Bfree) * uint64(st.Bsize)
	return snap, nil
}

func (s *Sampler) cpuPercent() (float64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.last
	if !s.haveLast {
		first, err := readCPU()
		if err != nil {
			return 0, err
		}
		prev = first
		time.Sleep(100 * time.Millisecond)
	}
	now, err := readCPU()
	if err != nil {
		return 0, err
	}
	s.last, s.haveLast = now, true
	if now.total <= prev.total {
		return 0, nil
	}
	pct := 100 * float64(now.busy-prev.busy) / float64(now.total-prev.total)
	return float64(int(pct*100)) / 100, nil
}

// readCPU sums the aggregate line of /proc/stat: idle and iowait are idle,
// everything else is busy.
func readCPU() (cpuTimes, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read /proc/stat: %w", err)
	}
	line, _, _ := bytes.Cut(data, []byte("\n"))
	fields := strings.Fields(string(line))
	if len(fields) < 5 || fields[0] != "cpu" {
		return cpuTimes{}, fmt.Errorf("unexpected /proc/stat line %q", line)
	}
	var t cpuTimes
	for i, f := range fields[1:] {
		if i >= 8 { // guest time is already counted in user time
			break
		}
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return cpuTimes{}, fmt.Errorf("parse /proc/stat: %w", err)
		}
		t.total += v
		if i != 3 && i != 4 { // idle, iowait
			t.busy += v
		}
	}
	return t, nil
}

// memory reads total and used memory; used excludes what the kernel can
// reclaim (MemAvailable), as `free` reports it.
func memory() (total, used uint64, err error) {
	t, err := procfs.Mem("MemTotal")
	if err != nil {
		return 0, 0, err
	}
	avail, err := procfs.Mem("MemAvailable")
	if err != nil {
		return 0, 0, err
	}
	return uint64(t), uint64(t - min(avail, t)), nil
}
