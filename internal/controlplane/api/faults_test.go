package api

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/testutil/freeport"
)

// privateCluster is a PostgreSQL cluster of the test's own, which it may
// stop and start (the shared test cluster must keep running).
type privateCluster struct {
	t      *testing.T
	script string
	env    []string
}

func startPrivateCluster(t *testing.T) (*privateCluster, string) {
	if os.Geteuid() != 0 || os.Getenv("WRENN_TEST_DATABASE_URL") == "" {
		t.Skip("needs root and a PostgreSQL installation (make test)")
	}
	_, file, _, _ := runtime.Caller(0)
	// /var/tmp, not the test's temporary folder: the postgres user must reach it.
	dir := "/var/tmp/wrenn-pgfault-" + ids.Random(6)
	pc := &privateCluster{t: t, script: filepath.Join(filepath.Dir(file), "../../../scripts/postgres.sh"),
		env: append(os.Environ(), "WRENN_PG_DIR="+dir, "WRENN_PG_PORT="+freeport.Get(t))}
	pc.run("start")
	t.Cleanup(func() {
		pc.run("stop")
		os.RemoveAll(dir)
	})
	return pc, pc.run("url")
}

// run calls scripts/postgres.sh ACTION for this cluster.
func (pc *privateCluster) run(action string) string {
	cmd := exec.Command("bash", pc.script, action)
	cmd.Env = pc.env
	out, err := cmd.Output()
	if err != nil {
		pc.t.Fatalf("postgres.sh %s: %v", action, err)
	}
	return strings.TrimSpace(string(out))
}

// PostgreSQL restarts under traffic: while it is down every request gets
// a prompt, clear 503; afterwards everything works again and nothing
// written before is lost.
func TestPostgresRestartDuringTraffic(t *testing.T) {
	pc, url := startPrivateCluster(t)
	c := newCPOn(t, url, []byte("test-secret-0123456789abcdef0123456789"))
	a := c.signup("restart@example.com")
	key := c.apiKey(a)

	var (
		mu       sync.Mutex
		statuses = map[int]int{}
		slowest  time.Duration
		stop     = make(chan struct{})
		wg       sync.WaitGroup
	)
	client := &http.Client{Timeout: 20 * time.Second}
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest("GET", c.url+"/v1/capsules", nil)
				req.Header.Set("X-API-Key", key)
				start := time.Now()
				resp, err := client.Do(req)
				took := time.Since(start)
				mu.Lock()
				if took > slowest {
					slowest = took
				}
				if err != nil {
					statuses[-1]++
				} else {
					statuses[resp.StatusCode]++
					if resp.StatusCode != 200 {
						var e response
						e.status = resp.StatusCode
						buf := make([]byte, 4096)
						n, _ := resp.Body.Read(buf)
						e.body = buf[:n]
						mu.Unlock()
						if code := e.errorCode(t); code != "database_unavailable" {
							t.Errorf("during the outage: %d %s", resp.StatusCode, e.body)
						}
						mu.Lock()
					}
					resp.Body.Close()
				}
				mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	pc.run("stop")
	time.Sleep(2 * time.Second)
	if r := c.do("GET", "/healthz", creds{}, nil); r.status != 503 {
		t.Errorf("healthz with the database down: %d %s", r.status, r.body)
	}
	pc.run("start")
	deadline := time.Now().Add(30 * time.Second)
	for c.do("GET", "/v1/capsules", creds{key: key}, nil).status != 200 {
		if time.Now().After(deadline) {
			t.Fatal("the API did not recover within 30 s of PostgreSQL coming back")
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("statuses %v, slowest answer %s", statuses, slowest.Round(time.Millisecond))
	if statuses[-1] > 0 || statuses[500] > 0 || statuses[http.StatusServiceUnavailable] == 0 || statuses[200] == 0 {
		t.Fatalf("want only 200s and 503s (and some of each): %v", statuses)
	}
	if slowest > 15*time.Second {
		t.Fatalf("a request hung for %s during the outage", slowest)
	}
	// What was written before is still there.
	c.want(c.do("GET", "/v1/api-keys", creds{jwt: a.jwt}, nil), 200)
	c.want(c.do("POST", "/v1/auth/login", creds{}, map[string]string{"email": "restart@example.com", "password": "correct horse"}), 200)
}
