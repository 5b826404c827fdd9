// Package metrics samples each running sandbox's VMM from the host every
// 500 ms (its CPU time against its vCPUs, its resident memory, the bytes
// its disk file holds) and keeps three tiers, as upstream Wrenn's agent:
// 10 minutes of every sample, 2 hours of 30-second averages and 24 hours
// of 5-minute averages.
package metrics

import (
	"sync"
	"time"
)

// Point is one sample (or average of samples).
type Point struct {
	At        time.Time
	CPUPct    float64
	MemBytes  int64
	DiskBytes int64
}

// The tiers: how many points each keeps and how many of the tier below
// make one of its points.
const (
	Interval    = 500 * time.Millisecond
	fineCap     = 1200 // 10 min of 500 ms
	mediumCap   = 240  // 2 h of 30 s
	coarseCap   = 288  // 24 h of 5 min
	mediumEvery = 60   // 500 ms × 60 = 30 s
	coarseEvery = 10   // 30 s × 10 = 5 min
)

// Tier names a ring.
type Tier int

// The tiers by the range they cover.
const (
	Fine   Tier = iota // 10 minutes
	Medium             // 2 hours
	Coarse             // 24 hours
)

// ring is a fixed circular buffer of points.
type ring struct {
	buf  []Point
	next int
	full bool
}

func newRing(n int) ring { return ring{buf: make([]Point, n)} }

func (r *ring) push(p Point) {
	r.buf[r.next] = p
	r.next = (r.next + 1) % len(r.buf)
	r.full = r.full || r.next == 0
}

// points returns the ring's points, oldest first.
func (r *ring) points() []Point {
	if !r.full {
		return append([]Point(nil), r.buf[:r.next]...)
	}
	return append(append([]Point(nil), r.buf[r.next:]...), r.buf[:r.next]...)
}

// Series is one sandbox's three tiers.
type Series struct {
	mu                   sync.Mutex
	fine, medium, coarse ring
	// Points waiting to be averaged into the next tier.
	toMedium, toCoarse []Point
}

// NewSeries makes an empty series.
func NewSeries() *Series {
	return &Series{fine: newRing(fineCap), medium: newRing(mediumCap), coarse: newRing(coarseCap)}
}

// Add records a sample and rolls averages up the tiers.
func (s *Series) Add(p Point) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fine.push(p)
	if s.toMedium = append(s.toMedium, p); len(s.toMedium) == mediumEvery {
		avg := average(s.toMedium)
		s.toMedium = s.toMedium[:0]
		s.medium.push(avg)
		if s.toCoarse = append(s.toCoarse, avg); len(s.toCoarse) == coarseEvery {
			s.coarse.push(average(s.toCoarse))
			s.toCoarse = s.toCoarse[:0]
		}
	}
}

// Points returns a tier's points, oldest first.
func (s *Series) Points(t Tier) []Point {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch t {
	case Medium:
		return s.medium.points()
	case Coarse:
		return s.coarse.points()
	}
	return s.fine.points()
}

// Last is the newest sample (ok false before the first).
func (s *Series) Last() (Point, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pts := s.fine.points()
	if len(pts) == 0 {
		return Point{}, false
	}
	return pts[len(pts)-1], true
}

// average is the points' mean, stamped with the last one's time; disk
// takes the largest (it only grows within a window that matters).
func average(pts []Point) Point {
	var out Point
	for _, p := range pts {
		out.CPUPct += p.CPUPct
		out.MemBytes += p.MemBytes
		out.DiskBytes = max(out.DiskBytes, p.DiskBytes)
	}
	n := float64(len(pts))
	out.CPUPct /= n
	out.MemBytes = int64(float64(out.MemBytes) / n)
	out.At = pts[len(pts)-1].At
	return out
}
