// Package cpbench measures the control plane against PostgreSQL and a
// real agent with QEMU VMs: GET /v1/capsules throughput and latency,
// capsule create through the API versus on the agent directly, the API's
// overhead on exec versus calling envd directly, and the sandbox
// ingress versus the agent's proxy and envd directly.
package cpbench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/envdclient"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/registration"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/agent/server"
	"github.com/wrenn/wrenn/internal/agent/vmm/qemu"
	"github.com/wrenn/wrenn/internal/bench"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/api"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

const suite = "control plane"

// Config sizes the runs.
type Config struct {
	DatabaseURL string // a PostgreSQL server; the suite makes and drops its own database
	WrennDir    string // where the kernel and images are
	ListRows    int    // capsule records GET /v1/capsules returns
	ListFor     time.Duration
	Creates     int // capsule creates to time (each boots a VM)
	ExecRuns    int
	// IngressBytes is the size of the download timed through the ingress.
	IngressBytes int64
	Log          *slog.Logger
}

// Run measures. It needs root (the agent's namespaces and TAP devices).
func Run(ctx context.Context, cfg Config) ([]bench.Result, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the control plane benchmark needs root (for its agent)")
	}
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	dbURL, drop, err := freshDatabase(ctx, cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	defer drop()
	st, err := store.Open(ctx, dbURL, 10*time.Second, quiet)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	agents := &agentclient.Pool{}
	srv := api.New(api.Config{Store: st, Signer: &auth.Signer{Secret: []byte(ids.Random(32))}, Agents: agents, Log: quiet, RatePerSecond: -1})
	defer srv.Close()
	// One reconcile pass on demand: it hands hosts their warm pool settings.
	reconcile := func(ctx context.Context) error {
		_, err := (&reconciler.Reconciler{Store: st, Agents: agents, Actions: srv, Log: quiet}).Pass(ctx)
		return err
	}
	cpURL, stopCP, err := serve(srv.Handler())
	if err != nil {
		return nil, err
	}
	defer stopCP()
	c := &client{base: cpURL, http: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}

	// An account, its key and an agent registered through the public flow.
	var login struct {
		Token  string `json:"token"`
		TeamID string `json:"team_id"`
	}
	if err := c.call("POST", "/v1/auth/signup", "", map[string]string{"email": "bench@example.com", "password": "bench password"}, 201, nil); err != nil {
		return nil, err
	}
	if err := c.call("POST", "/v1/auth/login", "", map[string]string{"email": "bench@example.com", "password": "bench password"}, 200, &login); err != nil {
		return nil, err
	}
	var key struct{ Key string }
	if err := c.call("POST", "/v1/api-keys", "Bearer "+login.Token, map[string]string{"name": "bench"}, 201, &key); err != nil {
		return nil, err
	}
	c.key = key.Key
	m, agentAt, stopAgent, err := startAgent(ctx, c, login.Token, cfg.WrennDir, quiet)
	if err != nil {
		return nil, err
	}
	defer stopAgent()

	var results []bench.Result
	list, err := listFigures(ctx, c, st, login.TeamID, cfg)
	if err != nil {
		return nil, err
	}
	results = append(results, list...)
	create, err := createFigures(ctx, c, m, reconcile, cfg)
	if err != nil {
		return nil, err
	}
	results = append(results, create...)
	execs, err := execFigures(ctx, c, m, cfg)
	if err != nil {
		return nil, err
	}
	results = append(results, execs...)
	ingress, err := ingressFigures(ctx, c, m, agentAt, cfg)
	if err != nil {
		return nil, err
	}
	return append(results, ingress...), nil
}

// listFigures loads cfg.ListRows capsule records and hammers the list.
func listFigures(ctx context.Context, c *client, st *store.Store, teamID string, cfg Config) ([]bench.Result, error) {
	for i := range cfg.ListRows {
		if _, err := st.InsertSandbox(ctx, store.Sandbox{ID: fmt.Sprintf("sb-listbench%08d", i), TeamID: teamID, Template: "minimal",
			Status: "paused", VCPUs: 1, MemoryMB: 256, Metadata: map[string]string{"n": fmt.Sprint(i)}}); err != nil {
			return nil, err
		}
	}
	workers := 4 * runtime.NumCPU()
	var (
		mu      sync.Mutex
		samples []time.Duration
		wg      sync.WaitGroup
		failed  error
	)
	deadline := time.Now().Add(cfg.ListFor)
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t := time.Now()
				if err := c.call("GET", "/v1/capsules?status=paused", "", nil, 200, nil); err != nil {
					mu.Lock()
					failed = err
					mu.Unlock()
					return
				}
				mine = append(mine, time.Since(t))
			}
			mu.Lock()
			samples = append(samples, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if failed != nil {
		return nil, failed
	}
	rps := float64(len(samples)) / took.Seconds()
	cfg.Log.Info("control plane: list", "requests", len(samples), "rps", int(rps))
	name := fmt.Sprintf("GET /v1/capsules (%d capsules, %d clients)", cfg.ListRows, workers)
	lat := bench.Latencies(suite, name+": latency", samples, "", nil)
	return []bench.Result{lat, {Suite: suite, Name: name + ": throughput", Unit: "req/s", Value: rps, N: len(samples)}}, nil
}

// createFigures times POST /v1/capsules?wait=true against creating the
// same sandbox on the agent directly, then creates concurrently.
func createFigures(ctx context.Context, c *client, m *sandbox.Manager, reconcile func(context.Context) error, cfg Config) ([]bench.Result, error) {
	var viaAPI, direct []time.Duration
	for i := range cfg.Creates {
		t := time.Now()
		var sb struct{ ID string }
		if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"memory_mb": 256}, 201, &sb); err != nil {
			return nil, err
		}
		viaAPI = append(viaAPI, time.Since(t))
		if err := c.call("DELETE", "/v1/capsules/"+sb.ID, "", nil, 204, nil); err != nil {
			return nil, err
		}
		id := fmt.Sprintf("sb-directbench%04d", i)
		t = time.Now()
		// The disk the API gives a capsule that asks for none (5 GiB): the
		// guest grows its file system into it at boot either way.
		if _, err := m.Create(ctx, sandbox.CreateParams{ID: id, Template: "minimal", VCPUs: 1, MemoryMiB: 256, DiskMiB: 5120, Timeout: time.Hour}); err != nil {
			return nil, err
		}
		direct = append(direct, time.Since(t))
		if err := m.Destroy(ctx, id); err != nil {
			return nil, err
		}
		cfg.Log.Info("control plane: create", "n", i+1, "api", viaAPI[i].Round(time.Millisecond), "agent", direct[i].Round(time.Millisecond))
	}
	// Concurrent creates: what the API sustains with the VMs booting in parallel.
	n := 2 * runtime.NumCPU()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	made := make(chan string, n)
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var sb struct{ ID string }
			if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"memory_mb": 256}, 201, &sb); err != nil {
				errs <- err
				return
			}
			made <- sb.ID
		}()
	}
	wg.Wait()
	took := time.Since(start)
	close(made)
	for id := range made {
		_ = c.call("DELETE", "/v1/capsules/"+id, "", nil, 204, nil)
	}
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	accel := qemu.New(slog.New(slog.DiscardHandler)).Accelerator()
	results := []bench.Result{
		bench.Latencies(suite, "POST /v1/capsules?wait=true to running ("+accel+")", viaAPI, "agent create directly", direct),
		{Suite: suite, Name: fmt.Sprintf("capsule creates, %d at once (%s)", n, accel), Unit: "creates/s", Value: float64(n) / took.Seconds(), N: n},
	}
	warm, err := createsFromMemory(c, cfg)
	if err != nil {
		return nil, fmt.Errorf("creates from a memory template: %w", err)
	}
	pooled, err := createsFromPool(ctx, c, m, reconcile, cfg)
	if err != nil {
		return nil, fmt.Errorf("creates from a warm pool: %w", err)
	}
	return append(results,
		bench.Latencies(suite, "POST /v1/capsules?wait=true from a memory template ("+accel+")", warm, "from minimal (boot)", viaAPI),
		bench.Latencies(suite, "POST /v1/capsules?wait=true from a warm pool ("+accel+")", pooled, "from minimal (boot)", viaAPI)), nil
}

// createsFromPool gives the memory template createsFromMemory made a warm
// pool of one through the API and times creates that take its member,
// each once the pool has refilled.
func createsFromPool(ctx context.Context, c *client, m *sandbox.Manager, reconcile func(context.Context) error, cfg Config) ([]time.Duration, error) {
	if err := c.call("PUT", "/v1/snapshots/bench-memory/warm-pool", "", map[string]any{"size": 1}, 200, nil); err != nil {
		return nil, err
	}
	if err := reconcile(ctx); err != nil {
		return nil, err
	}
	ready := func() error {
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			for _, p := range m.Pools() {
				if p.Ready == 1 && p.Starting == 0 {
					return nil
				}
			}
		}
		return fmt.Errorf("the warm pool did not fill: %+v", m.Pools())
	}
	var out []time.Duration
	for i := range cfg.Creates {
		if err := ready(); err != nil {
			return nil, err
		}
		t := time.Now()
		var sb struct {
			ID          string `json:"id"`
			StartedFrom string `json:"started_from"`
		}
		if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"template": "bench-memory"}, 201, &sb); err != nil {
			return nil, err
		}
		out = append(out, time.Since(t))
		if sb.StartedFrom != "pool" {
			return nil, fmt.Errorf("a capsule that fits the warm pool started from %q", sb.StartedFrom)
		}
		if err := c.call("DELETE", "/v1/capsules/"+sb.ID, "", nil, 204, nil); err != nil {
			return nil, err
		}
		cfg.Log.Info("control plane: create from a warm pool", "n", i+1, "api", out[i].Round(time.Millisecond))
	}
	// Drained with its setting, before the template goes.
	if err := c.call("PUT", "/v1/snapshots/bench-memory/warm-pool", "", map[string]any{"size": 0}, 200, nil); err != nil {
		return nil, err
	}
	return out, reconcile(ctx)
}

// createsFromMemory snapshots a running capsule into a template through the
// API and times creates from it (they start from its memory).
func createsFromMemory(c *client, cfg Config) ([]time.Duration, error) {
	var src struct{ ID string }
	if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"memory_mb": 256}, 201, &src); err != nil {
		return nil, err
	}
	defer func() { _ = c.call("DELETE", "/v1/capsules/"+src.ID, "", nil, 204, nil) }()
	var tpl struct {
		Name      string `json:"name"`
		HasMemory bool   `json:"has_memory"`
	}
	if err := c.call("POST", "/v1/snapshots", "", map[string]any{"sandbox_id": src.ID, "name": "bench-memory"}, 201, &tpl); err != nil {
		return nil, err
	}
	if !tpl.HasMemory {
		return nil, fmt.Errorf("the snapshot has no memory")
	}
	var out []time.Duration
	for i := range cfg.Creates {
		t := time.Now()
		var sb struct {
			ID          string `json:"id"`
			StartedFrom string `json:"started_from"`
			BootNote    string `json:"boot_note"`
		}
		if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"template": tpl.Name}, 201, &sb); err != nil {
			return nil, err
		}
		out = append(out, time.Since(t))
		if sb.StartedFrom != "memory" {
			return nil, fmt.Errorf("a capsule of the template's shape booted: %s", sb.BootNote)
		}
		if err := c.call("DELETE", "/v1/capsules/"+sb.ID, "", nil, 204, nil); err != nil {
			return nil, err
		}
		cfg.Log.Info("control plane: create from memory", "n", i+1, "api", out[i].Round(time.Millisecond))
	}
	return out, nil
}

// execFigures compares POST /v1/capsules/{id}/exec with the same command
// sent to the capsule's envd straight from the host.
func execFigures(ctx context.Context, c *client, m *sandbox.Manager, cfg Config) ([]bench.Result, error) {
	var sb struct{ ID string }
	if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"memory_mb": 256}, 201, &sb); err != nil {
		return nil, err
	}
	defer func() { _ = c.call("DELETE", "/v1/capsules/"+sb.ID, "", nil, 204, nil) }()
	envd, err := m.Envd(sb.ID)
	if err != nil {
		return nil, err
	}
	var viaAPI, direct []time.Duration
	body := map[string]any{"cmd": "true"}
	for range cfg.ExecRuns {
		t := time.Now()
		var out struct {
			ExitCode int `json:"exit_code"`
		}
		if err := c.call("POST", "/v1/capsules/"+sb.ID+"/exec", "", body, 200, &out); err != nil {
			return nil, err
		}
		viaAPI = append(viaAPI, time.Since(t))
		t = time.Now()
		if err := envd.Exec(ctx, envdclient.ExecSpec{Cmd: "true"}, func(envdclient.ExecEvent) error { return nil }); err != nil {
			return nil, err
		}
		direct = append(direct, time.Since(t))
	}
	return []bench.Result{bench.Latencies(suite, "exec `true`: REST API round trip", viaAPI, "envd directly", direct)}, nil
}

// startAgent runs an in-process agent (manager and RPC server) that
// registers through POST /v1/hosts and the registration call.
func startAgent(ctx context.Context, c *client, jwt, wrennDir string, log *slog.Logger) (*sandbox.Manager, agentEnd, func(), error) {
	work, err := os.MkdirTemp("", "wrenn-bench-cp")
	if err != nil {
		return nil, agentEnd{}, nil, err
	}
	// The host's kernels and minimal image, read only; templates the run
	// makes stay in its own directory.
	if err := os.Symlink(filepath.Join(wrennDir, "kernels"), filepath.Join(work, "kernels")); err != nil {
		return nil, agentEnd{}, nil, err
	}
	if err := os.Mkdir(filepath.Join(work, "images"), 0o755); err != nil {
		return nil, agentEnd{}, nil, err
	}
	if err := os.Symlink(filepath.Join(wrennDir, "images", "minimal"), filepath.Join(work, "images", "minimal")); err != nil {
		return nil, agentEnd{}, nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	m := sandbox.New(sandbox.Config{WrennDir: work, Driver: qemu.New(log), Disks: disk.Qcow2{}, Net: &network.Manager{Log: log}, Log: log,
		DNS: []netip.Addr{netip.MustParseAddr("1.1.1.1")}, DefaultTimeout: time.Hour, MemoryScratch: "/dev/shm"})
	cleanup := func() {
		for _, r := range m.List() {
			_ = m.Destroy(context.Background(), r.ID)
		}
		cancel()
		os.RemoveAll(work)
	}
	if err := m.Start(runCtx); err != nil {
		cleanup()
		return nil, agentEnd{}, nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cleanup()
		return nil, agentEnd{}, nil, err
	}
	var host struct {
		RegistrationToken string `json:"registration_token"`
	}
	if err := c.call("POST", "/v1/hosts", "Bearer "+jwt, map[string]string{"type": "regular"}, 201, &host); err != nil {
		cleanup()
		return nil, agentEnd{}, nil, err
	}
	creds, err := registration.Register(ctx, work, c.base, host.RegistrationToken, registration.Specs{
		Arch: runtime.GOARCH, CPUCores: int32(runtime.NumCPU()), MemoryMB: 16384, DiskGB: 100, Address: ln.Addr().String(), VMM: "qemu"}, false)
	if err != nil {
		cleanup()
		return nil, agentEnd{}, nil, err
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	hs := &http.Server{Handler: server.Handler(ctx, server.Config{Manager: m, Tokens: creds.Tokens, Log: log, WrennDir: work, VMM: "qemu"}), Protocols: &protocols}
	go func() { _ = hs.Serve(ln) }()
	end := agentEnd{addr: ln.Addr().String(), token: func() string { cur, _ := creds.Tokens(); return cur }}
	return m, end, func() { _ = hs.Close(); cleanup() }, nil
}

// agentEnd is where the bench reaches its agent's RPC listener (and its
// proxy into sandboxes) and the host token it answers.
type agentEnd struct {
	addr  string
	token func() string
}

func serve(h http.Handler) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	hs := &http.Server{Handler: h}
	go func() { _ = hs.Serve(ln) }()
	return "http://" + ln.Addr().String(), func() { _ = hs.Close() }, nil
}

// freshDatabase creates a database for the run on the server at url.
func freshDatabase(ctx context.Context, url string) (string, func(), error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return "", nil, fmt.Errorf("connect to PostgreSQL (set -database-url or run scripts/postgres.sh start): %w", err)
	}
	name := "wrenn_bench_" + ids.Random(6)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		conn.Close(ctx)
		return "", nil, fmt.Errorf("create database: %w", err)
	}
	cfg := conn.Config()
	u := fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", cfg.User, cfg.Password, net.JoinHostPort(cfg.Host, fmt.Sprint(cfg.Port)), name)
	return u, func() {
		_, _ = conn.Exec(context.Background(), "DROP DATABASE "+name+" WITH (FORCE)")
		conn.Close(context.Background())
	}, nil
}

// client calls the API with the bench's API key.
type client struct {
	base, key string
	http      *http.Client
}

func (c *client) call(method, path, authz string, body any, want int, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if authz != "" {
		req.Header.Set("Authorization", authz)
	} else if c.key != "" {
		req.Header.Set("X-API-Key", c.key)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, data)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}
