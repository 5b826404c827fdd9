// Command wrenn-bench runs Wrenn's benchmarks and prints one table; with
// -json it also writes the results for machines to read.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/bench"
	"github.com/wrenn/wrenn/internal/bench/agentbench"
	"github.com/wrenn/wrenn/internal/bench/bootbench"
	"github.com/wrenn/wrenn/internal/bench/cpbench"
	"github.com/wrenn/wrenn/internal/bench/envdbench"
	"github.com/wrenn/wrenn/internal/envconf"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "wrenn-bench:", err)
		os.Exit(1)
	}
}

func run() error {
	envd := flag.String("envd", "builds/envd", "envd binary to measure")
	jsonOut := flag.String("json", "", "also write the results as JSON to this file")
	execRuns := flag.Int("exec-runs", 300, "exec round trips to time")
	transferMiB := flag.Int64("transfer-mib", 256, "MiB per upload and download")
	boots := flag.Int("boots", 5, "guest boots to time")
	agentRuns := flag.Int("agent-runs", 5, "sandbox create/pause/resume cycles to time")
	idle := flag.Int("idle", 4, "idle sandboxes to measure the cost of")
	dense := flag.Int("dense", 20, "idle sandboxes from one memory template to weigh against as many cold-booted (0: skip)")
	wrennDir := flag.String("wrenn-dir", envconf.String("WRENN_DIR", "/var/lib/wrenn"), "where the kernel and images are")
	dbURL := flag.String("database-url", envconf.String("DATABASE_URL", ""), "PostgreSQL for the control plane suite (it makes and drops its own database)")
	listRows := flag.Int("list-rows", 100, "capsule records GET /v1/capsules returns")
	listFor := flag.Duration("list-for", 5*time.Second, "how long to load GET /v1/capsules")
	creates := flag.Int("creates", 5, "capsule creates through the API to time")
	suites := flag.String("suites", "envd,guest,agent,cp", "suites to run, comma-separated")
	flag.Parse()
	if *execRuns < 1 || *transferMiB < 1 || *boots < 1 {
		return fmt.Errorf("-exec-runs, -transfer-mib and -boots must be positive")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	want := map[string]bool{}
	for _, name := range strings.Split(*suites, ",") {
		switch name = strings.TrimSpace(name); name {
		case "envd", "guest", "agent", "cp":
			want[name] = true
		default:
			return fmt.Errorf("-suites: unknown suite %q (envd, guest, agent, cp)", name)
		}
	}
	started := time.Now()
	var results []bench.Result
	if want["envd"] {
		r, err := envdbench.Run(ctx, envdbench.Config{
			EnvdBinary: *envd, ExecRuns: *execRuns, TransferBytes: *transferMiB << 20, TransferRuns: 3, Log: log,
		})
		if err != nil {
			return fmt.Errorf("envd suite: %w", err)
		}
		results = append(results, r...)
	}
	if want["guest"] {
		r, err := bootbench.Run(ctx, bootbench.Config{WrennDir: *wrennDir, Boots: *boots, Log: log})
		if err != nil {
			return fmt.Errorf("guest suite: %w", err)
		}
		results = append(results, r...)
	}
	if want["agent"] {
		r, err := agentbench.Run(ctx, agentbench.Config{WrennDir: *wrennDir, Runs: *agentRuns, Idle: *idle, Dense: *dense, Log: log})
		if err != nil {
			return fmt.Errorf("agent suite: %w", err)
		}
		results = append(results, r...)
	}
	if want["cp"] && *dbURL == "" {
		return fmt.Errorf("the control plane suite needs -database-url (make bench passes the private cluster's)")
	}
	if want["cp"] {
		r, err := cpbench.Run(ctx, cpbench.Config{DatabaseURL: *dbURL, WrennDir: *wrennDir, ListRows: *listRows, ListFor: *listFor,
			Creates: *creates, ExecRuns: *execRuns, IngressBytes: *transferMiB << 20, Log: log})
		if err != nil {
			return fmt.Errorf("control plane suite: %w", err)
		}
		results = append(results, r...)
	}

	host, _ := os.Hostname()
	fmt.Printf("\nWrenn benchmarks on %s (%d CPUs, %s/%s), %s\n\n", host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, time.Since(started).Round(time.Second))
	if err := bench.PrintTable(os.Stdout, results); err != nil {
		return err
	}
	if *jsonOut != "" {
		data, err := json.MarshalIndent(struct {
			Host    string         `json:"host"`
			CPUs    int            `json:"cpus"`
			When    time.Time      `json:"when"`
			Results []bench.Result `json:"results"`
		}{host, runtime.NumCPU(), time.Now().UTC(), results}, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(*jsonOut, data, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", *jsonOut, err)
		}
		fmt.Printf("\nJSON: %s\n", *jsonOut)
	}
	return nil
}
