package api

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/fulldisk"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
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

// The agent is killed (SIGKILL) while a capsule boots: the create ends
// cleanly with a reason, the restarted agent clears the half-made VM, and
// after a reconcile pass the database and the host agree, with no VM left
// that nobody owns.
func TestAgentKilledDuringCreate(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	a := c.startAgentProc(admin)
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"memory_mb": 256}), 202).json(t, &sb)
	time.Sleep(700 * time.Millisecond) // QEMU is starting; the guest is not up yet
	_ = a.cmd.Process.Kill()
	_ = a.cmd.Wait()

	// The create answers for itself: error with a reason (or running, had it finished).
	deadline := time.Now().Add(time.Minute)
	var got struct {
		Status       string `json:"status"`
		StatusReason string `json:"status_reason"`
	}
	for {
		c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
		if got.Status != "starting" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the capsule stayed starting after its agent died")
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("after the kill: %s (%s)", got.Status, got.StatusReason)
	if got.Status == "error" && got.StatusReason == "" {
		t.Fatal("a failed create must say why")
	}

	a.restart(admin)
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log}
	for range 2 {
		if _, err := rec.Pass(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
	list, err := c.srv.agents.Get(a.hostID, a.addr, c.hostToken(a.hostID)).ListSandboxes(context.Background(), connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	onHost := map[string]string{}
	for _, s := range list.Msg.GetSandboxes() {
		onHost[s.GetId()] = s.GetState().String()
	}
	switch got.Status {
	case "running":
		if _, ok := onHost[sb.ID]; !ok {
			t.Fatalf("the database says running, the host has nothing: %v", onHost)
		}
	default:
		if len(onHost) != 0 {
			t.Fatalf("the database says %s, the host still has %v", got.Status, onHost)
		}
		if out, _ := exec.Command("pgrep", "-f", "qemu-system.*-name "+sb.ID).Output(); len(out) > 0 {
			t.Fatalf("a QEMU of the failed create is still running: %s", out)
		}
	}
	if got.Status == "running" {
		c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
	}
}

// The agent is killed during a pause and during a resume: each call fails
// with a clear error, and once the agent is back the capsule settles into
// a state the host agrees with and can be used (resumed, or run commands).
func TestAgentKilledDuringPauseAndResume(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	a := c.startAgentProc(admin)
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &sb)
	c.exec(key, sb.ID, "/bin/sh", "-c", "echo kept > /home/user/mark")
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log, StuckAfter: time.Millisecond}
	status := func() string {
		var got capsuleOut
		c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
		return got.Status
	}
	// usable brings the capsule back to running whatever state it settled in.
	usable := func(when string) {
		t.Helper()
		for range 3 {
			if _, err := rec.Pass(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		switch st := status(); st {
		case "paused":
			c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/resume", creds{key: key}, nil), 202)
		case "running":
		default:
			t.Fatalf("%s: the capsule settled as %s", when, st)
		}
		if out, _ := c.exec(key, sb.ID, "cat", "/home/user/mark"); out != "kept\n" {
			t.Fatalf("%s: the capsule lost its file: %q", when, out)
		}
	}
	for _, op := range []string{"pause", "resume"} {
		if op == "resume" {
			c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/pause", creds{key: key}, nil), 202)
		}
		done := make(chan response, 1)
		go func() { done <- c.do("POST", "/v1/capsules/"+sb.ID+"/"+op, creds{key: key}, nil) }()
		time.Sleep(40 * time.Millisecond)
		_ = a.cmd.Process.Kill()
		_ = a.cmd.Wait()
		r := <-done
		t.Logf("%s with the agent killed: %d %s", op, r.status, r.body)
		if r.status != 202 {
			if r.status < 400 || r.status == 500 {
				t.Fatalf("%s: %d %s", op, r.status, r.body)
			}
			r.errorCode(t)
		}
		a.restart(admin)
		usable("after a killed " + op)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
}

// The disk under the agent's WRENN_DIR fills up: a create and a pause
// through the API are refused with the reason, the running capsule keeps
// running with its files, nothing half made is left in the database or on
// the host, and everything works again once space is freed.
func TestFullDiskThroughTheAPI(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	dir := guestimages.AgentDirIn(t, fulldisk.Mount(t, 1024))
	a := c.startAgentProcIn(admin, dir, "--min-free-mib", "64")
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &sb)
	if out, code := c.exec(key, sb.ID, "sh", "-c", "echo kept > /home/user/mark && sync"); code != 0 {
		t.Fatalf("write: %q", out)
	}

	filler := fulldisk.Fill(t, dir)
	createResp := c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256})
	t.Logf("create on a full disk: %d %s", createResp.status, createResp.body)
	if createResp.status != 503 || !strings.Contains(string(createResp.body), "host_full") || !strings.Contains(string(createResp.body), "free disk space under WRENN_DIR") {
		t.Fatalf("create on a full disk: %d %s", createResp.status, createResp.body)
	}
	r := c.do("POST", "/v1/capsules/"+sb.ID+"/pause", creds{key: key}, nil)
	if r.status != 503 || !strings.Contains(string(r.body), "free disk space under WRENN_DIR") {
		t.Fatalf("pause on a full disk: %d %s", r.status, r.body)
	}
	var got capsuleOut
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
	if got.Status != "running" {
		t.Fatalf("after a refused pause the capsule is %q", got.Status)
	}
	// (Its guest may be held by now, waiting for a disk write: its files
	// are read back once space is freed, below.)

	// The database and the host agree after a reconcile pass: the refused
	// create left no VM, and its record says why it failed.
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log}
	if _, err := rec.Pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	list, err := c.srv.agents.Get(a.hostID, a.addr, c.hostToken(a.hostID)).ListSandboxes(context.Background(), connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(list.Msg.GetSandboxes()); n != 1 || list.Msg.GetSandboxes()[0].GetId() != sb.ID {
		t.Fatalf("host holds %d sandboxes, want only %s: %v", n, sb.ID, list.Msg.GetSandboxes())
	}
	refused := regexp.MustCompile(`sb-[a-z0-9]+`).FindString(string(createResp.body))
	var failed struct {
		Status string `json:"status"`
		Error  string `json:"status_reason"`
	}
	c.want(c.do("GET", "/v1/capsules/"+refused, creds{key: key}, nil), 200).json(t, &failed)
	if failed.Status != "error" || !strings.Contains(failed.Error, "free disk space") {
		t.Fatalf("the refused create is %+v in the database", failed)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/pause", creds{key: key}, nil), 202)
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/resume", creds{key: key}, nil), 202)
	if out, _ := c.exec(key, sb.ID, "cat", "/home/user/mark"); out != "kept\n" {
		t.Fatalf("after pause and resume: %q", out)
	}
	var fresh capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &fresh)
	for _, id := range []string{sb.ID, fresh.ID} {
		c.want(c.do("DELETE", "/v1/capsules/"+id, creds{key: key}, nil), 204)
	}
}
