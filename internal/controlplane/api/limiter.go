package api

import (
	"strconv"
	"sync"
	"time"
)

// limiter is a token bucket per caller. It is per replica: N replicas
// allow N times the rate, which is the accepted trade for no shared state.
type limiter struct {
	rate  float64
	burst float64

	mu      sync.Mutex
	buckets map[string]*bucket
	swept   time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(rate float64, burst int) *limiter {
	return &limiter{rate: rate, burst: float64(burst), buckets: map[string]*bucket{}}
}

// allow takes a token for key, or says how many seconds to wait.
func (l *limiter) allow(key string) (string, bool) {
	if l.rate < 0 {
		return "", true
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.swept) > time.Minute {
		// Forget only buckets that have refilled: a forgotten bucket
		// comes back full, so forgetting a spent one would reset it.
		for k, b := range l.buckets {
			if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
				delete(l.buckets, k)
			}
		}
		l.swept = now
	}
	b, ok := l.buckets[key]
	if !ok {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[key] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return "", true
	}
	wait := (1 - b.tokens) / l.rate
	if l.rate <= 0 || wait > 24*3600 {
		wait = 24 * 3600
	}
	return strconv.Itoa(int(wait) + 1), false
}
