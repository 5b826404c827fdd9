package agentbench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/bench"
	"github.com/wrenn/wrenn/internal/procfs"
)

const memoryTemplate = "bench-memory"

// memoryTemplates measures sandboxes started from a template's memory
// against cold boots of the same image and shape: create latency, creates
// a second with 8 at once, and the host memory of idle ones.
func memoryTemplates(ctx context.Context, m *sandbox.Manager, cfg Config, cold []time.Duration) ([]bench.Result, error) {
	shape := func(id, tpl string) sandbox.CreateParams {
		return sandbox.CreateParams{ID: id, Template: tpl, VCPUs: 1, MemoryMiB: 256}
	}
	if _, err := m.Create(ctx, shape("sb-bench-origin", "minimal")); err != nil {
		return nil, err
	}
	saveStart := time.Now()
	if _, err := m.SaveAsTemplate(ctx, "sb-bench-origin", memoryTemplate, "bench", true); err != nil {
		return nil, err
	}
	saved := time.Since(saveStart)
	if err := m.Destroy(ctx, "sb-bench-origin"); err != nil {
		return nil, err
	}
	defer func() { _ = m.DeleteTemplate(memoryTemplate) }()

	var creates []time.Duration
	for i := range cfg.Runs {
		id := fmt.Sprintf("sb-bench-clone-%d", i)
		start := time.Now()
		rec, err := m.Create(ctx, shape(id, memoryTemplate))
		if err != nil {
			return nil, err
		}
		creates = append(creates, time.Since(start))
		if rec.StartedFrom != sandbox.StartedMemory {
			return nil, fmt.Errorf("a sandbox of the template's shape booted: %s", rec.BootNote)
		}
		if err := m.Destroy(ctx, id); err != nil {
			return nil, err
		}
	}
	cfg.Log.Info("agent: creates from memory", "runs", len(creates), "p50", bench.Percentile(creates, 50).Round(time.Millisecond))
	results := []bench.Result{
		bench.Latencies(suite, "create from a memory template to envd ready", creates, "cold create", cold),
		{Suite: suite, Name: "snapshot of a running 256 MiB sandbox into a memory template", Unit: "ms", Value: float64(saved.Milliseconds()), N: 1},
	}

	const together = 8
	warmRate, err := createRate(ctx, m, together, func(i int) sandbox.CreateParams { return shape(fmt.Sprintf("sb-bench-par-m%d", i), memoryTemplate) })
	if err != nil {
		return nil, err
	}
	coldRate, err := createRate(ctx, m, together, func(i int) sandbox.CreateParams { return shape(fmt.Sprintf("sb-bench-par-c%d", i), "minimal") })
	if err != nil {
		return nil, err
	}
	results = append(results, bench.Result{Suite: suite, Name: fmt.Sprintf("creates a second, %d at once, from a memory template", together), Unit: "/s",
		Value: warmRate, N: together, Baseline: "cold", BaselineValue: coldRate, Ratio: warmRate / coldRate})

	forks, err := forkFigures(ctx, m, cfg)
	if err != nil {
		return nil, fmt.Errorf("fork: %w", err)
	}
	results = append(results, forks...)

	if cfg.Dense > 0 {
		warm, err := idlePSS(ctx, m, cfg.Dense, func(i int) sandbox.CreateParams { return shape(fmt.Sprintf("sb-bench-dense-m%d", i), memoryTemplate) })
		if err != nil {
			return nil, err
		}
		coldPSS, err := idlePSS(ctx, m, cfg.Dense, func(i int) sandbox.CreateParams { return shape(fmt.Sprintf("sb-bench-dense-c%d", i), "minimal") })
		if err != nil {
			return nil, err
		}
		cfg.Log.Info("agent: idle host memory", "sandboxes", cfg.Dense, "from_memory_mib", warm, "cold_mib", coldPSS)
		results = append(results, bench.Result{Suite: suite, Name: fmt.Sprintf("%d idle sandboxes from one memory template: host memory (sum of PSS)", cfg.Dense), Unit: "MiB",
			Value: warm, N: cfg.Dense, Baseline: "as many cold-booted", BaselineValue: coldPSS, Ratio: warm / coldPSS})
	}
	return results, nil
}

// createRate creates n sandboxes at once and returns creates a second.
func createRate(ctx context.Context, m *sandbox.Manager, n int, params func(int) sandbox.CreateParams) (float64, error) {
	errs := make([]error, n)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = m.Create(ctx, params(i))
		}()
	}
	wg.Wait()
	took := time.Since(start)
	for i := range n {
		_ = m.Destroy(ctx, params(i).ID)
	}
	for _, err := range errs {
		if err != nil {
			return 0, err
		}
	}
	return float64(n) / took.Seconds(), nil
}

// idlePSS starts n sandboxes, lets them settle, sums their VMMs'
// proportional memory in MiB and destroys them.
func idlePSS(ctx context.Context, m *sandbox.Manager, n int, params func(int) sandbox.CreateParams) (float64, error) {
	var pids []int
	defer func() {
		for i := range n {
			_ = m.Destroy(context.Background(), params(i).ID)
		}
	}()
	for i := range n {
		rec, err := m.Create(ctx, params(i))
		if err != nil {
			return 0, err
		}
		pids = append(pids, rec.VMM.PID)
	}
	time.Sleep(5 * time.Second)
	var total int64
	for _, p := range pids {
		total += procfs.PSS(p)
	}
	return float64(total) / (1 << 20), nil
}

// forkFigures times forks of a running 512 MiB sandbox into 1 and into 8
// usable sandboxes (each answered by its envd).
func forkFigures(ctx context.Context, m *sandbox.Manager, cfg Config) ([]bench.Result, error) {
	const src = "sb-bench-fork-src"
	if _, err := m.Create(ctx, sandbox.CreateParams{ID: src, Template: "minimal", VCPUs: 1, MemoryMiB: 512}); err != nil {
		return nil, err
	}
	defer func() { _ = m.Destroy(context.Background(), src) }()
	var results []bench.Result
	for _, n := range []int{1, 8} {
		var samples []time.Duration
		for run := range max(1, cfg.Runs/2) {
			ids := make([]string, n)
			for i := range ids {
				ids[i] = fmt.Sprintf("sb-bench-fork-%d-%d-%d", n, run, i)
			}
			start := time.Now()
			if _, err := m.Fork(ctx, src, ids, 0, false); err != nil {
				return nil, err
			}
			samples = append(samples, time.Since(start))
			for _, id := range ids {
				if err := m.Destroy(ctx, id); err != nil {
					return nil, err
				}
			}
		}
		cfg.Log.Info("agent: fork", "into", n, "p50", bench.Percentile(samples, 50).Round(time.Millisecond))
		results = append(results, bench.Latencies(suite, fmt.Sprintf("fork of a running 512 MiB sandbox into %d, to envd ready", n), samples, "", nil))
	}
	return results, nil
}
