package api

import (
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// Usage and stats come from the run history that a trigger keeps on every
// state change; this test writes states and history the way the API and
// reconciler do and checks the figures a user would read.
func TestUsageAndStats(t *testing.T) {
	c := newCP(t)
	a := c.signup("usage@example.com")
	other := c.signup("other@example.com")
	key := c.apiKey(a)
	ctx := t.Context()

	// A capsule that runs now: 2 vCPUs, 512 MB.
	if _, err := c.st.InsertSandbox(ctx, store.Sandbox{ID: "sb-usage0000000000001", TeamID: a.teamID, Template: "minimal", Status: "starting", VCPUs: 2, MemoryMB: 512}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.Transition(ctx, "sb-usage0000000000001", []string{"starting"}, "running", nil); err != nil {
		t.Fatal(err)
	}
	// History: a 1-vCPU, 1024 MB capsule ran two hours across a midnight
	// three days ago (60 minutes on each day).
	today := time.Now().UTC().Truncate(24 * time.Hour)
	start := today.AddDate(0, 0, -3).Add(23 * time.Hour)
	if _, err := c.st.Pool.Exec(ctx, `INSERT INTO sandbox_runs (sandbox_id, team_id, vcpus, memory_mb, started_at, ended_at)
		VALUES ('sb-usage0000000000002', $1, 1, 1024, $2, $3)`, a.teamID, start, start.Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}

	var usage struct {
		From, To string
		Points   []struct {
			Date         string  `json:"date"`
			CPUMinutes   float64 `json:"cpu_minutes"`
			RAMMBMinutes float64 `json:"ram_mb_minutes"`
		}
	}
	from := today.AddDate(0, 0, -4).Format(time.DateOnly)
	c.want(c.do("GET", "/v1/capsules/usage?from="+from, creds{key: key}, nil), 200).json(t, &usage)
	if len(usage.Points) != 5 || usage.From != from || usage.To != today.Format(time.DateOnly) {
		t.Fatalf("usage days: %+v", usage)
	}
	for i, want := range []float64{0, 60, 60, 0} {
		if p := usage.Points[i]; p.CPUMinutes != want || p.RAMMBMinutes != want*1024 {
			t.Fatalf("day %s: %+v, want %v cpu minutes", p.Date, p, want)
		}
	}
	if today := usage.Points[4]; today.CPUMinutes <= 0 || today.CPUMinutes > 2*24*60 {
		t.Fatalf("today's usage of the running capsule: %+v", today)
	}

	var stats struct {
		Range   string
		Current struct {
			RunningCount     int `json:"running_count"`
			VCPUsReserved    int `json:"vcpus_reserved"`
			MemoryMBReserved int `json:"memory_mb_reserved"`
		}
		Peaks struct {
			RunningCount int `json:"running_count"`
			VCPUs        int `json:"vcpus"`
			MemoryMB     int `json:"memory_mb"`
		}
		Series struct {
			Labels  []string
			Running []int
			VCPUs   []int `json:"vcpus"`
		}
	}
	c.want(c.do("GET", "/v1/capsules/stats?range=5m", creds{key: key}, nil), 200).json(t, &stats)
	if stats.Current.RunningCount != 1 || stats.Current.VCPUsReserved != 2 || stats.Current.MemoryMBReserved != 512 {
		t.Fatalf("current: %+v", stats.Current)
	}
	if stats.Peaks.RunningCount != 1 || stats.Peaks.VCPUs != 2 || stats.Peaks.MemoryMB != 1024 {
		t.Fatalf("30-day peaks: %+v", stats.Peaks)
	}
	n := len(stats.Series.Labels)
	if n < 30 || len(stats.Series.Running) != n || stats.Series.Running[n-1] != 1 || stats.Series.VCPUs[n-1] != 2 {
		t.Fatalf("series: %+v", stats.Series)
	}
	c.want(c.do("GET", "/v1/capsules/stats?range=30d", creds{key: key}, nil), 200).json(t, &stats)
	if len(stats.Series.Labels) < 120 {
		t.Fatalf("30d series has %d points", len(stats.Series.Labels))
	}

	// Pausing ends the run: the team has nothing running.
	if _, err := c.st.Transition(ctx, "sb-usage0000000000001", []string{"running"}, "paused", nil); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("GET", "/v1/capsules/stats", creds{key: key}, nil), 200).json(t, &stats)
	if stats.Range != "1h" || stats.Current.RunningCount != 0 || stats.Series.Running[len(stats.Series.Running)-1] != 0 {
		t.Fatalf("after pause: %+v", stats)
	}

	// Another team sees none of it.
	c.want(c.do("GET", "/v1/capsules/usage?from="+from, creds{jwt: other.jwt}, nil), 200).json(t, &usage)
	for _, p := range usage.Points {
		if p.CPUMinutes != 0 {
			t.Fatalf("other team's usage: %+v", usage)
		}
	}

	// Bad parameters.
	for _, q := range []string{"/v1/capsules/stats?range=7d", "/v1/capsules/usage?from=yesterday", "/v1/capsules/usage?from=2026-02-01&to=2026-01-01",
		"/v1/capsules/usage?from=2020-01-01&to=2026-01-01", "/v1/capsules/sb-usage0000000000001/metrics?range=3m"} {
		if code := c.want(c.do("GET", q, creds{key: key}, nil), 400).errorCode(t); code != "invalid_request" {
			t.Fatalf("%s: %s", q, code)
		}
	}
	// A paused capsule's metrics answer with what was sampled (nothing here);
	// a stopped one's are gone.
	var m struct {
		Points []any `json:"points"`
	}
	c.want(c.do("GET", "/v1/capsules/sb-usage0000000000001/metrics", creds{key: key}, nil), 200).json(t, &m)
	if _, err := c.st.Transition(ctx, "sb-usage0000000000001", []string{"paused"}, "stopped", nil); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("GET", "/v1/capsules/sb-usage0000000000001/metrics", creds{key: key}, nil), 404)
}

// Ping keeps a capsule alive and can set its timeout.
func TestPingSetsTimeout(t *testing.T) {
	c := newCP(t)
	a := c.signup("ping@example.com")
	key := c.apiKey(a)
	if _, err := c.st.InsertSandbox(t.Context(), store.Sandbox{ID: "sb-ping0000000000001", TeamID: a.teamID, Template: "minimal", Status: "running", VCPUs: 1, MemoryMB: 256}); err != nil {
		t.Fatal(err)
	}
	timeout := func() int {
		var out struct {
			TimeoutSec int `json:"timeout_sec"`
		}
		c.want(c.do("GET", "/v1/capsules/sb-ping0000000000001", creds{key: key}, nil), 200).json(t, &out)
		return out.TimeoutSec
	}
	c.want(c.do("POST", "/v1/capsules/sb-ping0000000000001/ping", creds{key: key}, nil), 204)
	c.want(c.do("POST", "/v1/capsules/sb-ping0000000000001/ping", creds{key: key}, map[string]int{"timeout_sec": 600}), 204)
	if got := timeout(); got != 600 {
		t.Fatalf("timeout %d, want 600", got)
	}
	c.want(c.do("POST", "/v1/capsules/sb-ping0000000000001/ping", creds{key: key}, map[string]int{"timeout_sec": 5}), 204)
	if got := timeout(); got != 60 {
		t.Fatalf("timeout %d, want 60 (raised)", got)
	}
	c.want(c.do("POST", "/v1/capsules/sb-ping0000000000001/ping", creds{key: key}, map[string]int{"timeout_sec": -1}), 400)
	c.want(c.do("POST", "/v1/capsules/sb-ping0000000000001/ping", creds{key: key}, map[string]int{"timeout_sec": 0}), 204)
	if got := timeout(); got != 0 {
		t.Fatalf("timeout %d, want 0", got)
	}
}
