package api

import (
	"strconv"
	"testing"
	"time"
)

// A spent bucket is not forgotten when the limiter sweeps (forgetting
// refills it), and a slow limiter answers a sane Retry-After.
func TestLimiterKeepsSpentBuckets(t *testing.T) {
	l := newLimiter(10.0/3600, 2) // ten an hour
	for range 2 {
		if _, ok := l.allow("k"); !ok {
			t.Fatal("the burst was refused")
		}
	}
	wait, ok := l.allow("k")
	if n, err := strconv.Atoi(wait); ok || err != nil || n < 300 || n > 400 {
		t.Fatalf("after the burst: %q %v", wait, ok)
	}
	// A minute later the sweep runs; the bucket holds a sixth of a token.
	l.buckets["k"].last = l.buckets["k"].last.Add(-61 * time.Second)
	l.swept = time.Now().Add(-2 * time.Minute)
	if _, ok := l.allow("k"); ok {
		t.Fatal("the sweep refilled a spent bucket")
	}
}
