package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// A team sets a warm pool on its template through the API; its host keeps
// that many capsules of it ready, a create takes one (its own id, host
// name and environment) and the pool refills; the template goes with its
// pool.
func TestWarmPoolThroughTheAPI(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	call := func(method, path, auth string, body any, into any) int {
		t.Helper()
		data, _ := json.Marshal(body)
		req, _ := http.NewRequestWithContext(ctx, method, s.url+path, bytes.NewReader(data))
		req.Header.Set("Content-Type", "application/json")
		if auth == "token" {
			req.Header.Set("Authorization", "Bearer "+s.token)
		} else {
			req.Header.Set("X-API-Key", s.key)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		if into != nil {
			_ = json.NewDecoder(res.Body).Decode(into)
		}
		return res.StatusCode
	}
	src, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	mustSh(ctx, t, c, src.ID, `nohup sh -c 'exec sleep 100000' >/dev/null 2>&1 & echo started`)
	if _, err := c.CreateSnapshot(ctx, src.ID, "pooled"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DestroyCapsule(ctx, src.ID); err != nil {
		t.Fatal(err)
	}

	if code := call("PUT", "/v1/snapshots/pooled/warm-pool", "key", map[string]any{"size": 99}, nil); code != http.StatusBadRequest {
		t.Fatalf("a pool of 99: %d", code)
	}
	if code := call("PUT", "/v1/snapshots/minimal/warm-pool", "key", map[string]any{"size": 1}, nil); code != http.StatusNotFound {
		t.Fatalf("a team setting the platform's minimal: %d", code)
	}
	one := 1
	if got, err := c.SetWarmPool(ctx, "pooled", &one); err != nil || got.WarmPoolSize == nil || *got.WarmPoolSize != 1 {
		t.Fatalf("set the pool: %+v %v", got, err)
	}
	// The host reports the member ready (reconcile passes run every second here).
	ready := func(want int) {
		t.Helper()
		for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(250 * time.Millisecond) {
			var hosts []struct {
				WarmPools []struct {
					Ready, Starting int
					Claims          int64
				} `json:"warm_pools"`
			}
			call("GET", "/v1/hosts", "token", nil, &hosts)
			n := 0
			for _, h := range hosts {
				for _, p := range h.WarmPools {
					n += p.Ready
				}
			}
			if n == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("hosts report %d ready warm capsules, want %d: %+v", n, want, hosts)
			}
		}
	}
	ready(1)

	start := time.Now()
	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "pooled", Envs: map[string]string{"WHO": "pooled"}, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("capsule from the warm pool in %v", time.Since(start).Round(time.Millisecond))
	if sb.StartedFrom != "pool" {
		t.Fatalf("the capsule started from %q (%s)", sb.StartedFrom, sb.BootNote)
	}
	if out := mustSh(ctx, t, c, sb.ID, `pgrep -x sleep >/dev/null && echo kept; hostname; echo "$WHO $WRENN_SANDBOX_ID"`); out != "kept\n"+sb.ID+"\npooled "+sb.ID {
		t.Fatalf("in the capsule from the pool:\n%s", out)
	}
	ready(1) // refilled

	if _, err := c.DestroyCapsule(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteTemplate(ctx, "pooled"); err != nil {
		t.Fatalf("delete the pooled template: %v", err)
	}
	ready(0)
	s.nothingLeft()
}
