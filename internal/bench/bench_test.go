package bench

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 100; i >= 1; i-- {
		s = append(s, time.Duration(i)*time.Millisecond)
	}
	if got := Percentile(s, 50); got != 50*time.Millisecond {
		t.Fatalf("p50 = %v", got)
	}
	if got := Percentile(s, 99); got != 99*time.Millisecond {
		t.Fatalf("p99 = %v", got)
	}
	if got := Percentile(s[:1], 99); got != 100*time.Millisecond {
		t.Fatalf("p99 of one = %v", got)
	}
	if Percentile(nil, 50) != 0 {
		t.Fatal("empty")
	}
}

func TestTable(t *testing.T) {
	r := Latencies("envd", "exec", []time.Duration{2 * time.Millisecond}, "fork/exec", []time.Duration{time.Millisecond})
	if r.Ratio != 2 || r.P50 != 2 || r.BaselineValue != 1 {
		t.Fatalf("%+v", r)
	}
	tp := Throughput("envd", "upload", 100<<20, time.Second, "loopback", 500*time.Millisecond)
	if tp.Value != 100 || tp.BaselineValue != 200 || tp.Ratio != 0.5 {
		t.Fatalf("%+v", tp)
	}
	var out bytes.Buffer
	if err := PrintTable(&out, []Result{r, tp}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "2.00x") || !strings.Contains(out.String(), "0.50x") {
		t.Fatalf("table:\n%s", out.String())
	}
}
