// Package bench holds what every Wrenn benchmark reports, and prints it as
// one table. Suites live in subpackages; cmd/wrenn-bench runs them.
package bench

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Result is one measured figure, compared with a named baseline.
type Result struct {
	Suite string `json:"suite"`
	Name  string `json:"name"`
	Unit  string `json:"unit"` // "ms" for latencies, "MiB/s" for throughput, ...
	// For latencies: the median and 99th percentile. For single figures
	// (throughput, sizes) Value is set and the percentiles are zero.
	P50   float64 `json:"p50,omitempty"`
	P99   float64 `json:"p99,omitempty"`
	Value float64 `json:"value,omitempty"`
	N     int     `json:"n"`

	Baseline      string  `json:"baseline"`
	BaselineValue float64 `json:"baseline_value"` // baseline's p50 or value
	// Ratio is this figure over the baseline's; for latency lower is
	// better, for throughput higher is better.
	Ratio float64 `json:"ratio"`
}

// Latencies summarises samples as a latency result, against a baseline's samples.
func Latencies(suite, name string, samples []time.Duration, baseline string, base []time.Duration) Result {
	p50, p99 := Percentile(samples, 50), Percentile(samples, 99)
	b50 := Percentile(base, 50) // zero when there is no baseline
	r := Result{Suite: suite, Name: name, Unit: "ms", P50: ms(p50), P99: ms(p99), N: len(samples), Baseline: baseline, BaselineValue: ms(b50)}
	if b50 > 0 {
		r.Ratio = float64(p50) / float64(b50)
	}
	return r
}

// Throughput reports bytes moved in a duration, against a baseline's.
func Throughput(suite, name string, bytes int64, took time.Duration, baseline string, baseTook time.Duration) Result {
	v := mibPerSec(bytes, took)
	b := mibPerSec(bytes, baseTook)
	r := Result{Suite: suite, Name: name, Unit: "MiB/s", Value: v, N: 1, Baseline: baseline, BaselineValue: b}
	if b > 0 {
		r.Ratio = v / b
	}
	return r
}

func mibPerSec(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / (1 << 20) / d.Seconds()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Percentile returns the p-th percentile (nearest rank) of samples.
func Percentile(samples []time.Duration, p int) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	rank := (p*len(s) + 99) / 100 // ceil(p/100 * n)
	if rank < 1 {
		rank = 1
	}
	return s[rank-1]
}

// PrintTable writes results as an aligned table.
func PrintTable(w io.Writer, results []Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SUITE\tBENCHMARK\tP50\tP99\tVALUE\tUNIT\tN\tBASELINE\tBASELINE P50/VALUE\tRATIO")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n",
			r.Suite, r.Name, num(r.P50), num(r.P99), num(r.Value), r.Unit, r.N, r.Baseline, num(r.BaselineValue), ratio(r.Ratio))
	}
	return tw.Flush()
}

func num(v float64) string {
	if v == 0 {
		return "-"
	}
	s := fmt.Sprintf("%.3f", v)
	if v >= 100 {
		s = fmt.Sprintf("%.1f", v)
	}
	return strings.TrimRight(strings.TrimRight(s, "0"), ".")
}

func ratio(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", v)
}
