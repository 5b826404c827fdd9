// Package agentbench measures the host agent's sandbox lifecycle against
// the bare VMM: create-to-ready versus QEMU booting the same kernel and
// image by itself, resume versus a cold create, and what an idle sandbox
// costs in memory and CPU.
package agentbench

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/agent/vmm/qemu"
	"github.com/wrenn/wrenn/internal/bench"
	"github.com/wrenn/wrenn/internal/guest/boot"
	"github.com/wrenn/wrenn/internal/guest/kernel"
	"github.com/wrenn/wrenn/internal/procfs"
)

const suite = "agent"

// Config sizes the runs.
type Config struct {
	WrennDir string // where the kernel and images are
	Runs     int    // creates, pauses and resumes to time
	Idle     int    // sandboxes to keep idle for the cost figures
	// Dense is how many idle sandboxes from one memory template are
	// weighed against as many cold-booted ones.
	Dense int
	Log   *slog.Logger
}

// Run measures. It needs root (namespaces, TAP devices, iptables).
func Run(ctx context.Context, cfg Config) ([]bench.Result, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the agent benchmark needs root")
	}
	work, err := os.MkdirTemp("", "wrenn-bench-agent")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	// The host's kernels and images, read only; templates the run makes
	// stay in its own directory.
	if err := os.Symlink(filepath.Join(cfg.WrennDir, "kernels"), filepath.Join(work, "kernels")); err != nil {
		return nil, err
	}
	if err := os.Mkdir(filepath.Join(work, "images"), 0o755); err != nil {
		return nil, err
	}
	if err := os.Symlink(filepath.Join(cfg.WrennDir, "images", "minimal"), filepath.Join(work, "images", "minimal")); err != nil {
		return nil, err
	}
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	driver := qemu.New(quiet)
	m := sandbox.New(sandbox.Config{
		WrennDir: work, Driver: driver, Disks: disk.Qcow2{}, Net: &network.Manager{Log: quiet}, Log: quiet,
		DNS: []netip.Addr{netip.MustParseAddr("1.1.1.1")}, DefaultTimeout: time.Hour, MemoryScratch: "/dev/shm", // as wrenn-agent's default
	})
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	if err := m.Start(runCtx); err != nil {
		return nil, err
	}
	defer func() {
		for _, r := range m.List() {
			_ = m.Destroy(context.Background(), r.ID)
		}
	}()

	params := func(id string) sandbox.CreateParams {
		return sandbox.CreateParams{ID: id, Template: "minimal", VCPUs: 1, MemoryMiB: 256}
	}
	var creates, pauses, resumes []time.Duration
	for i := range cfg.Runs {
		id := fmt.Sprintf("sb-bench-%d", i)
		start := time.Now()
		if _, err := m.Create(ctx, params(id)); err != nil {
			return nil, fmt.Errorf("create: %w", err)
		}
		creates = append(creates, time.Since(start))
		start = time.Now()
		if _, err := m.Pause(ctx, id); err != nil {
			return nil, fmt.Errorf("pause: %w", err)
		}
		pauses = append(pauses, time.Since(start))
		start = time.Now()
		if _, err := m.Resume(ctx, id, 0); err != nil {
			return nil, fmt.Errorf("resume: %w", err)
		}
		resumes = append(resumes, time.Since(start))
		if err := m.Destroy(ctx, id); err != nil {
			return nil, err
		}
		cfg.Log.Info("agent: lifecycle run", "n", i+1, "create", creates[i].Round(time.Millisecond), "resume", resumes[i].Round(time.Millisecond))
	}

	bare, err := bareBoots(ctx, cfg.WrennDir, work, cfg.Runs)
	if err != nil {
		return nil, err
	}
	accel := driver.Accelerator()
	results := []bench.Result{
		bench.Latencies(suite, "create to envd ready ("+accel+")", creates, "bare QEMU boot to envd ready", bare),
		bench.Latencies(suite, "pause (memory snapshot, VMM stops)", pauses, "", nil),
		bench.Latencies(suite, "resume to envd ready ("+accel+")", resumes, "cold create", creates),
	}

	idle, err := idleCost(ctx, m, cfg)
	if err != nil {
		return nil, err
	}
	results = append(results, idle...)
	mem, err := memoryTemplates(ctx, m, cfg, creates)
	if err != nil {
		return nil, fmt.Errorf("memory templates: %w", err)
	}
	return append(results, mem...), nil
}

// bareBoots times QEMU booting the same kernel and image with nothing of
// the agent around it: the floor for create.
func bareBoots(ctx context.Context, wrennDir, work string, n int) ([]time.Duration, error) {
	kernelPath, err := kernel.Pick(wrennDir)
	if err != nil {
		return nil, err
	}
	var out []time.Duration
	for i := range n {
		vm, err := boot.Start(ctx, boot.Options{Kernel: kernelPath, Rootfs: filepath.Join(wrennDir, "images/minimal/rootfs.ext4"), ConsoleLog: filepath.Join(work, fmt.Sprintf("bare-%d.log", i))})
		if err != nil {
			return nil, err
		}
		d, err := vm.WaitReady(ctx, 2*time.Minute)
		vm.Stop()
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// idleCost boots cfg.Idle sandboxes, lets them settle, and measures the
// VMMs' resident memory and CPU use while idle.
func idleCost(ctx context.Context, m *sandbox.Manager, cfg Config) ([]bench.Result, error) {
	var pids []int
	for i := range cfg.Idle {
		rec, err := m.Create(ctx, sandbox.CreateParams{ID: fmt.Sprintf("sb-idle-%d", i), Template: "minimal", VCPUs: 1, MemoryMiB: 256})
		if err != nil {
			return nil, fmt.Errorf("idle sandbox: %w", err)
		}
		pids = append(pids, rec.VMM.PID)
	}
	time.Sleep(5 * time.Second) // let boot-time work finish
	cpuBefore := cpuTicks(pids)
	const window = 10 * time.Second
	time.Sleep(window)
	cpuUsed := float64(cpuTicks(pids)-cpuBefore) / 100 / window.Seconds() // ticks are 1/100 s
	var rss int64
	for _, p := range pids {
		rss += procfs.RSS(p)
	}
	n := float64(len(pids))
	perRSS := float64(rss) / n / (1 << 20)
	perCPU := cpuUsed / n * 100 // percent of one core
	availBytes, _ := procfs.Mem("MemAvailable")
	avail := float64(availBytes) / (1 << 20)
	cores := float64(numCPU())
	byMem := avail / perRSS
	byCPU := cores * 100 / perCPU
	cfg.Log.Info("agent: idle cost", "sandboxes", len(pids), "rss_mib_each", perRSS, "cpu_pct_each", perCPU)
	return []bench.Result{
		{Suite: suite, Name: "idle sandbox: VMM resident memory (256 MiB guest)", Unit: "MiB", Value: perRSS, N: len(pids)},
		{Suite: suite, Name: "idle sandbox: host CPU (% of one core)", Unit: "%", Value: perCPU, N: len(pids)},
		{Suite: suite, Name: "idle sandboxes this host holds, by free memory", Unit: "count", Value: byMem, N: len(pids), Baseline: "MemAvailable MiB", BaselineValue: avail},
		{Suite: suite, Name: "idle sandboxes this host holds, by CPU (all cores busy)", Unit: "count", Value: byCPU, N: len(pids), Baseline: "cores x 100 %", BaselineValue: cores * 100},
	}, nil
}

func cpuTicks(pids []int) int64 {
	var total int64
	for _, p := range pids {
		total += procfs.CPUTicks(p)
	}
	return total
}

func numCPU() int {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 1
	}
	return max(strings.Count(string(data), "processor\t:"), 1)
}
