package cpbench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/bench"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
)

// envdPort is envd's port in every guest: its /health and /files are the
// server the paths reach.
const envdPort = 49983

// path is one way to reach envd in the capsule.
type path struct {
	name string
	do   func(ctx context.Context, method, p string) (*http.Response, error)
}

// ingressFigures compares envd reached through the control plane's
// ingress with the agent's proxy and with envd directly: HTTP round trips
// (GET /health) and a download of cfg.IngressBytes (GET /files). A bare
// reverse proxy's round trip shows what any extra hop costs the host.
func ingressFigures(ctx context.Context, c *client, m *sandbox.Manager, agent agentEnd, cfg Config) ([]bench.Result, error) {
	var sb struct {
		ID              string `json:"id"`
		EnvdAccessToken string `json:"envd_access_token"`
	}
	// Memory for the file, which lives in the guest's RAM (/dev/shm).
	if err := c.call("POST", "/v1/capsules?wait=true", "", map[string]any{"memory_mb": 1024, "public": true}, 201, &sb); err != nil {
		return nil, err
	}
	defer func() { _ = c.call("DELETE", "/v1/capsules/"+sb.ID, "", nil, 204, nil) }()
	rec, err := m.Get(sb.ID)
	if err != nil {
		return nil, err
	}
	size := cfg.IngressBytes
	var out struct {
		ExitCode int    `json:"exit_code"`
		Stderr   string `json:"stderr"`
	}
	mk := fmt.Sprintf("head -c %d /dev/zero > /dev/shm/big", size)
	if err := c.call("POST", "/v1/capsules/"+sb.ID+"/exec", "", map[string]any{"cmd": "/bin/sh", "args": []string{"-c", mk}, "timeout_sec": 120}, 200, &out); err != nil || out.ExitCode != 0 {
		return nil, fmt.Errorf("make the file to download: %v %s", err, out.Stderr)
	}

	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8, DisableCompression: true}}
	cpHost := strings.TrimPrefix(c.base, "http://")
	direct := "http://" + net.JoinHostPort(rec.Net.SandboxIP.String(), fmt.Sprint(envdPort))
	send := func(ctx context.Context, method, u, host string, h http.Header) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, method, u, nil)
		if err != nil {
			return nil, err
		}
		if host != "" {
			req.Host = host
		}
		for k, v := range h {
			req.Header[k] = v
		}
		req.Header.Set("X-Access-Token", sb.EnvdAccessToken)
		return hc.Do(req)
	}
	// The agent's proxy: a CONNECT tunnel through the agent (what the
	// ingress uses underneath), its connections kept like any others.
	pool := &agentclient.Pool{}
	tunnel := pool.Tunnel("bench-host", agent.addr, agent.token(), sb.ID, envdPort)
	tunnelled := &http.Client{Transport: tunnel}
	// The reference for the ingress: the least a hop can be, a bare
	// reverse proxy on loopback over the same kind of tunnel.
	bare, stopBare, err := serve(&httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(&url.URL{Scheme: "http", Host: "envd"}) },
		Transport: tunnel,
	})
	if err != nil {
		return nil, err
	}
	defer stopBare()
	paths := []path{
		{"envd directly", func(ctx context.Context, method, p string) (*http.Response, error) {
			return send(ctx, method, direct+p, "", nil)
		}},
		{"agent proxy", func(ctx context.Context, method, p string) (*http.Response, error) {
			return tunnelled.Do(withToken(ctx, method, "http://envd"+p, sb.EnvdAccessToken))
		}},
		{"control plane ingress", func(ctx context.Context, method, p string) (*http.Response, error) {
			return send(ctx, method, c.base+p, fmt.Sprintf("%d-%s.%s", envdPort, sb.ID, cpHost), nil)
		}},
		{"a bare reverse proxy", func(ctx context.Context, method, p string) (*http.Response, error) {
			return send(ctx, method, bare+p, "", nil)
		}},
	}
	call := func(pt path, p string, sink io.Writer) (time.Duration, int64, error) {
		start := time.Now()
		res, err := pt.do(ctx, http.MethodGet, p)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", pt.name, err)
		}
		defer res.Body.Close()
		n, err := io.Copy(sink, res.Body)
		if err != nil {
			return 0, n, fmt.Errorf("%s: %w", pt.name, err)
		}
		if res.StatusCode/100 != 2 {
			return 0, n, fmt.Errorf("%s: GET %s answered %d", pt.name, p, res.StatusCode)
		}
		return time.Since(start), n, nil
	}

	// Round trips, interleaved so that drift affects every path alike, in
	// a fresh order each time: a TCG guest is still busy for a while after
	// it answers, which would otherwise slow whichever path comes next.
	trips := make([][]time.Duration, len(paths))
	for i := 0; i < cfg.ExecRuns+20; i++ {
		for _, j := range rand.Perm(len(paths)) {
			pt := paths[j]
			d, _, err := call(pt, "/health", io.Discard)
			if err != nil {
				return nil, err
			}
			if i >= 20 { // warm connections first
				trips[j] = append(trips[j], d)
			}
		}
	}
	// Downloads, interleaved: the median of three for each path but the
	// reference (a TCG guest's sending speed swings from run to run).
	downloads := paths[:3]
	took := make([][]time.Duration, len(downloads))
	for run := 0; run < 3; run++ {
		for j, pt := range downloads {
			d, n, err := call(pt, "/files?path="+url.QueryEscape("/dev/shm/big")+"&username=root", io.Discard)
			if err != nil {
				return nil, err
			}
			if n != size {
				return nil, fmt.Errorf("%s: downloaded %d bytes of %d", pt.name, n, size)
			}
			took[j] = append(took[j], d)
		}
	}
	best := make([]time.Duration, len(took))
	for j := range took {
		best[j] = bench.Percentile(took[j], 50)
	}
	mib := size >> 20
	return []bench.Result{
		bench.Latencies(suite, "HTTP round trip to envd: agent proxy", trips[1], "envd directly", trips[0]),
		bench.Latencies(suite, "HTTP round trip to envd: control plane ingress", trips[2], "envd directly", trips[0]),
		bench.Latencies(suite, "HTTP round trip to envd: a bare reverse proxy (the least a hop costs)", trips[3], "envd directly", trips[0]),
		bench.Throughput(suite, fmt.Sprintf("%d MiB download: agent proxy", mib), size, best[1], "envd directly", best[0]),
		bench.Throughput(suite, fmt.Sprintf("%d MiB download: control plane ingress", mib), size, best[2], "envd directly", best[0]),
	}, nil
}

func withToken(ctx context.Context, method, u, token string) *http.Request {
	req, _ := http.NewRequestWithContext(ctx, method, u, nil)
	req.Header.Set("X-Access-Token", token)
	return req
}
