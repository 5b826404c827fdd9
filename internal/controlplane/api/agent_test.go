package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/gobin"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	"github.com/wrenn/wrenn/internal/testutil/hostlock"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// agentProc is a real wrenn-agent process under test.
type agentProc struct {
	c      *cp
	bin    string
	dir    string
	addr   string
	hostID string
	extra  []string
	log    *os.File
	cmd    *exec.Cmd
}

// startAgent runs a real wrenn-agent that registers with the control plane
// through the public flow (POST /v1/hosts, then --register); extra are
// more agent flags.
func (c *cp) startAgent(admin account, extra ...string) (hostID string, stop func()) {
	a := c.startAgentProc(admin, extra...)
	return a.hostID, a.stop
}

func (c *cp) startAgentProc(admin account, extra ...string) *agentProc {
	return c.startAgentProcIn(admin, guestimages.AgentDir(c.t), extra...)
}

// startAgentProcIn is startAgentProc on a WRENN_DIR the test prepared.
func (c *cp) startAgentProcIn(admin account, dir string, extra ...string) *agentProc {
	t := c.t
	if os.Geteuid() != 0 {
		t.Skip("the agent needs root for namespaces, TAP devices and iptables")
	}
	if !c.hostLocked {
		hostlock.Take(t) // once per test: the lock is not reentrant
		c.hostLocked = true
	}
	hostID, token := c.newHostToken(admin)
	// The log lives outside WRENN_DIR: it must tell even when that disk is full.
	logf, err := os.Create(filepath.Join(t.TempDir(), "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	a := &agentProc{c: c, bin: gobin.Path(t, "wrenn-agent"), dir: dir, addr: "127.0.0.1:" + freeport.Get(t), hostID: hostID, extra: extra, log: logf}
	t.Cleanup(func() {
		// A test that failed half way leaves VMs the agent would keep
		// running after it stops: destroy whatever is still there.
		if a.running() {
			h, _ := c.st.Host(context.Background(), hostID)
			address := a.addr
			if h.Address != nil {
				address = *h.Address
			}
			ag := c.srv.agents.Get(hostID, address, c.hostToken(hostID))
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			if list, err := ag.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{})); err == nil {
				for _, sb := range list.Msg.GetSandboxes() {
					_, _ = ag.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: sb.GetId()}))
				}
			}
			cancel()
		}
		a.stop()
		// VMs the agent could not be asked to destroy (it was stopped by the test).
		_ = exec.Command("pkill", "-KILL", "-f", "qemu-system.*"+dir).Run()
		if t.Failed() {
			data, _ := os.ReadFile(logf.Name())
			t.Logf("agent log:\n%s", data)
		}
	})
	if c.agentDirs == nil {
		c.agentDirs = map[string]string{}
	}
	c.agentDirs[hostID] = dir
	a.run("--register", token, "--address", a.addr)
	a.waitOnline(admin)
	if _, err := os.Stat(filepath.Join(dir, "host-token")); err != nil {
		t.Fatalf("the agent did not save its token: %v", err)
	}
	return a
}

func (a *agentProc) run(args ...string) {
	a.cmd = exec.Command(a.bin, append(append([]string{"--listen", a.addr, "--dir", a.dir,
		"--cp-url", a.c.url, "--heartbeat-interval", "1s", "--log-level", "debug"}, args...), a.extra...)...)
	a.cmd.Env = append(os.Environ(), "WRENN_HOST_TOKEN=")
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		a.c.t.Fatal(err)
	}
}

func (a *agentProc) running() bool {
	return a.cmd != nil && a.cmd.Process != nil && a.cmd.ProcessState == nil
}

// stop ends the agent process; its VMs keep running, as in production.
func (a *agentProc) stop() {
	if a.running() {
		_ = a.cmd.Process.Signal(os.Interrupt)
		_ = a.cmd.Wait()
	}
}

// restart starts the agent again with the credentials it saved.
func (a *agentProc) restart(admin account) {
	a.stop()
	a.run()
	a.waitOnline(admin)
}

func (a *agentProc) waitOnline(admin account) {
	t, c := a.c.t, a.c
	deadline := time.Now().Add(60 * time.Second)
	for {
		var h struct {
			Status  string `json:"status"`
			Address string `json:"address"`
		}
		c.want(c.do("GET", "/v1/hosts/"+a.hostID, creds{jwt: admin.jwt}, nil), 200).json(t, &h)
		if h.Status == "online" {
			// The record may still say online from before a restart: ask the agent itself.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := c.srv.agents.Get(a.hostID, h.Address, c.hostToken(a.hostID)).GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
			cancel()
			if err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			data, _ := os.ReadFile(a.log.Name())
			t.Fatalf("agent did not come online:\n%s", data)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type capsuleOut struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	HostID string `json:"host_id"`
}

func (c *cp) exec(key, id string, args ...string) (string, int) {
	c.t.Helper()
	var out struct {
		Stdout   string `json:"stdout"`
		ExitCode int    `json:"exit_code"`
	}
	c.want(c.do("POST", "/v1/capsules/"+id+"/exec", creds{key: key}, map[string]any{"cmd": args[0], "args": args[1:]}), 200).json(c.t, &out)
	return out.Stdout, out.ExitCode
}

// The capsule journey through the public API against a real agent and a
// real QEMU VM.
func TestCapsulesOnARealAgent(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	hostID, _ := c.startAgent(admin)
	key := c.apiKey(admin)

	// Create returns at once with "starting"; exec waits for it to run.
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"memory_mb": 256, "metadata": map[string]string{"purpose": "test"}}), 202).json(t, &sb)
	if sb.Status != "starting" || sb.HostID != hostID {
		t.Fatalf("create: %+v", sb)
	}
	out, code := c.exec(key, sb.ID, "/bin/sh", "-c", "echo hello from wrenn; exit 3")
	if out != "hello from wrenn\n" || code != 3 {
		t.Fatalf("exec: %q %d", out, code)
	}
	var got capsuleOut
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
	if got.Status != "running" {
		t.Fatalf("after exec: %+v", got)
	}

	// An egress policy travels to the host; bad ones are refused up front.
	for _, bad := range []map[string]any{
		{"mode": "allow_list"}, {"mode": "deny_all", "deny": []string{"198.51.100.0/24"}},
		{"mode": "allow_all", "deny": []string{"not-a-cidr"}}, {"mode": "open"},
	} {
		c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{"egress": bad}), 400)
	}
	var fenced struct {
		capsuleOut
		Egress struct {
			Mode  string   `json:"mode"`
			Allow []string `json:"allow"`
		} `json:"egress"`
	}
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256,
		"egress": map[string]any{"mode": "allow_list", "allow": []string{"198.51.100.0/30"}}}), 201).json(t, &fenced)
	if fenced.Egress.Mode != "allow_list" || len(fenced.Egress.Allow) != 1 {
		t.Fatalf("the capsule's egress: %+v", fenced.Egress)
	}
	onHost, err := c.srv.agents.Get(hostID, c.hostAddress(hostID), c.hostToken(hostID)).GetSandbox(context.Background(), connect.NewRequest(&pb.GetSandboxRequest{Id: fenced.ID}))
	if err != nil || onHost.Msg.GetSandbox().GetEgress().GetMode() != pb.EgressPolicy_MODE_ALLOW_LIST || len(onHost.Msg.GetSandbox().GetEgress().GetAllowCidrs()) != 1 {
		t.Fatalf("the host's policy for the capsule: %v %v", onHost, err)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+fenced.ID, creds{key: key}, nil), 204)

	// Metrics: the host's samples of the VMM every 500 ms for recent
	// ranges (as upstream's), then the samples a reconcile pass stores.
	var m struct {
		Points []struct {
			Timestamp   int64   `json:"timestamp_unix"`
			TimestampMs int64   `json:"timestamp_unix_ms"`
			CPUPct      float64 `json:"cpu_pct"`
			MemBytes    int64   `json:"mem_bytes"`
			DiskBytes   int64   `json:"disk_bytes"`
		} `json:"points"`
	}
	c.want(c.do("GET", "/v1/capsules/"+sb.ID+"/metrics", creds{key: key}, nil), 200).json(t, &m)
	if n := len(m.Points); n < 2 || m.Points[n-1].MemBytes <= 0 || m.Points[n-1].DiskBytes <= 0 || m.Points[n-1].CPUPct > 100 ||
		m.Points[n-1].TimestampMs < time.Now().Add(-5*time.Second).UnixMilli() {
		t.Fatalf("recent metrics: %+v", m)
	}
	if gap := m.Points[1].TimestampMs - m.Points[0].TimestampMs; gap < 300 || gap > 1500 {
		t.Fatalf("recent samples %d ms apart, want about 500", gap)
	}
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log}
	if ran, err := rec.Pass(context.Background()); err != nil || !ran {
		t.Fatalf("pass: %v %v", ran, err)
	}
	var stored int
	if err := c.st.Pool.QueryRow(t.Context(), "SELECT count(*) FROM sandbox_metrics WHERE sandbox_id = $1", sb.ID).Scan(&stored); err != nil || stored != 1 {
		t.Fatalf("samples stored by the reconciler: %d %v", stored, err)
	}
	c.want(c.do("GET", "/v1/capsules/"+sb.ID+"/metrics?range=1h", creds{key: key}, nil), 200).json(t, &m)
	if len(m.Points) == 0 || m.Points[0].MemBytes <= 0 || m.Points[len(m.Points)-1].Timestamp < time.Now().Add(-time.Minute).Unix() {
		t.Fatalf("sampled metrics: %+v", m)
	}
	var storedAt time.Time
	if err := c.st.Pool.QueryRow(t.Context(), "SELECT max(at) FROM sandbox_metrics WHERE sandbox_id = $1", sb.ID).Scan(&storedAt); err != nil {
		t.Fatal(err)
	}
	sampledAt := storedAt.Unix()
	var listed []capsuleOut
	c.want(c.do("GET", "/v1/capsules?metadata.purpose=test", creds{key: key}, nil), 200).json(t, &listed)
	if len(listed) != 1 || listed[0].ID != sb.ID {
		t.Fatalf("metadata filter: %+v", listed)
	}
	c.want(c.do("GET", "/v1/capsules?metadata.purpose=other", creds{key: key}, nil), 200).json(t, &listed)
	if len(listed) != 0 {
		t.Fatalf("metadata filter matched: %+v", listed)
	}

	// Binary output comes back base64.
	var bin struct {
		Stdout, Encoding string
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/exec", creds{key: key}, map[string]any{"cmd": "/bin/sh", "args": []string{"-c", `printf '\377\376'`}}), 200).json(t, &bin)
	if bin.Encoding != "base64" || bin.Stdout != "//4=" {
		t.Fatalf("binary exec: %+v", bin)
	}

	// Files: upload, list, download, remove.
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("path", "/home/user/note.txt")
	fw, _ := mw.CreateFormFile("file", "note.txt")
	_, _ = fw.Write([]byte("kept across pause"))
	_ = mw.Close()
	req, _ := http.NewRequest("POST", c.url+"/v1/capsules/"+sb.ID+"/files/write", &body)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("X-API-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 204 {
		t.Fatalf("upload: %v %v", resp.StatusCode, err)
	}
	resp.Body.Close()
	r := c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/files/read", creds{key: key}, map[string]string{"path": "/home/user/note.txt"}), 200)
	if string(r.body) != "kept across pause" {
		t.Fatalf("download: %q", r.body)
	}
	var ls struct {
		Entries []struct{ Name, Type string } `json:"entries"`
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/files/list", creds{key: key}, map[string]string{"path": "/home/user"}), 200).json(t, &ls)
	if !strings.Contains(fmt.Sprint(ls.Entries), "note.txt") {
		t.Fatalf("listing: %+v", ls)
	}
	if r := c.do("POST", "/v1/capsules/"+sb.ID+"/files/read", creds{key: key}, map[string]string{"path": "/nope"}); r.status != 404 {
		t.Fatalf("missing file: %d %s", r.status, r.body)
	}
	// files/write passes uploads on in chunks and stops at 64 MiB: one
	// byte more is refused, and no part of the file is left.
	pr, pw := io.Pipe()
	big := multipart.NewWriter(pw)
	go func() {
		_ = big.WriteField("path", "/home/user/big")
		fw, err := big.CreateFormFile("file", "big")
		for i := 0; err == nil && i < 64; i++ {
			_, err = fw.Write(bytes.Repeat([]byte("z"), 1<<20))
		}
		if err == nil {
			_, err = fw.Write([]byte("z"))
		}
		if err == nil {
			err = big.Close()
		}
		pw.CloseWithError(err)
	}()
	req, _ = http.NewRequest("POST", c.url+"/v1/capsules/"+sb.ID+"/files/write", pr)
	req.Header.Set("Content-Type", big.FormDataContentType())
	req.Header.Set("X-API-Key", key)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("an upload over 64 MiB: %d", resp.StatusCode)
		}
	}
	if r := c.do("POST", "/v1/capsules/"+sb.ID+"/files/read", creds{key: key}, map[string]string{"path": "/home/user/big"}); r.status != 404 {
		t.Fatalf("a refused upload left a file: %d", r.status)
	}
	// A command's output beyond 1 MiB per stream is cut, and says so.
	var long struct {
		Stdout    string `json:"stdout"`
		Truncated bool   `json:"truncated"`
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/exec", creds{key: key}, map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "head -c 3000000 /dev/zero | tr '\\0' a"}}), 200).json(t, &long)
	if len(long.Stdout) != 1<<20 || !long.Truncated {
		t.Fatalf("long output: %d bytes, truncated %v", len(long.Stdout), long.Truncated)
	}

	// Streaming exec over a WebSocket.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, strings.Replace(c.url, "http", "ws", 1)+"/v1/capsules/"+sb.ID+"/exec/stream",
		&websocket.DialOptions{HTTPHeader: http.Header{"X-API-Key": {key}}})
	if err != nil {
		t.Fatal(err)
	}
	start, _ := json.Marshal(map[string]any{"type": "start", "cmd": "/bin/sh", "args": []string{"-c", "for i in 1 2 3; do echo line $i; done; echo oops >&2"}})
	_ = ws.Write(ctx, websocket.MessageText, start)
	var stdout, stderr string
	exitCode := -1
	for exitCode < 0 {
		_, msg, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("stream ended early: %v (stdout %q)", err, stdout)
		}
		var ev struct {
			Type     string `json:"type"`
			Data     string `json:"data"`
			ExitCode *int   `json:"exit_code"`
		}
		_ = json.Unmarshal(msg, &ev)
		switch ev.Type {
		case "stdout":
			stdout += ev.Data
		case "stderr":
			stderr += ev.Data
		case "exit":
			exitCode = *ev.ExitCode
		case "error":
			t.Fatalf("stream error: %s", ev.Data)
		}
	}
	ws.CloseNow()
	if stdout != "line 1\nline 2\nline 3\n" || stderr != "oops\n" || exitCode != 0 {
		t.Fatalf("stream: %q %q %d", stdout, stderr, exitCode)
	}

	// A browser's way, as upstream Wrenn's: no credentials on the upgrade,
	// a JWT in the first message; anything else is told why and closed.
	streamURL := strings.Replace(c.url, "http", "ws", 1) + "/v1/capsules/" + sb.ID + "/exec/stream"
	firstFrame := func(auth any) (string, websocket.StatusCode) {
		t.Helper()
		ws, _, err := websocket.Dial(ctx, streamURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		msg, _ := json.Marshal(auth)
		_ = ws.Write(ctx, websocket.MessageText, msg)
		start, _ := json.Marshal(map[string]any{"type": "start", "cmd": "whoami"})
		_ = ws.Write(ctx, websocket.MessageText, start)
		var out string
		for {
			_, data, err := ws.Read(ctx)
			if err != nil {
				return out, websocket.CloseStatus(err)
			}
			var ev struct{ Type, Data string }
			_ = json.Unmarshal(data, &ev)
			switch ev.Type {
			case "stdout", "error":
				out += ev.Data
			case "exit":
				return out, -1
			}
		}
	}
	if out, _ := firstFrame(map[string]string{"type": "auth", "token": admin.jwt}); out != "root\n" {
		t.Fatalf("first-frame auth: %q", out)
	}
	for _, bad := range []any{map[string]string{"type": "auth", "token": "not-a-jwt"}, map[string]string{"type": "start", "cmd": "id"}, "junk"} {
		if out, code := firstFrame(bad); code != websocket.StatusPolicyViolation || !strings.Contains(out, "unauthorized") {
			t.Fatalf("first frame %v: %q, close %d", bad, out, code)
		}
	}

	checkPTY(t, c, key, sb.ID)

	// Paths only ever name files inside the guest: traversal and symlinks
	// toward the host's secrets find nothing of the host.
	hostToken := c.hostToken(hostID)
	c.exec(key, sb.ID, "ln", "-s", "/../../../../../../../../tmp", "/home/user/escape")
	for _, p := range []string{"/../../../../.." + mustAgentDir(t, c, hostID) + "/host-token", "/home/user/escape/../../../etc/shadow",
		"/home/user/escape/" + filepath.Base(mustAgentDir(t, c, hostID)) + "/host-token"} {
		r := c.do("POST", "/v1/capsules/"+sb.ID+"/files/read", creds{key: key}, map[string]string{"path": p})
		if hostToken != "" && strings.Contains(string(r.body), hostToken) {
			t.Fatalf("reading %q returned the host's token", p)
		}
		if r.status != 404 && r.status != 403 && r.status != 200 {
			t.Fatalf("reading %q: %d %s", p, r.status, r.body)
		}
	}
	for _, name := range []string{"../../etc", "a/b", ".hidden", strings.Repeat("x", 80)} {
		c.want(c.do("POST", "/v1/snapshots", creds{key: key}, map[string]string{"sandbox_id": sb.ID, "name": name}), 400)
	}

	// A background process survives pause and resume, as does memory.
	var bg struct {
		PID int    `json:"pid"`
		Tag string `json:"tag"`
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/exec", creds{key: key}, map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo $$ > /tmp/bg.pid; sleep 600"}, "background": true, "tag": "sleeper"}), 202).json(t, &bg)
	if bg.PID == 0 || bg.Tag != "sleeper" {
		t.Fatalf("background: %+v", bg)
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/pause", creds{key: key}, nil), 202).json(t, &got)
	if got.Status != "paused" {
		t.Fatalf("pause: %+v", got)
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/exec", creds{key: key}, map[string]any{"cmd": "true"}), 409)
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/pause", creds{key: key}, nil), 409)
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/resume", creds{key: key}, nil), 202).json(t, &got)
	if got.Status != "running" {
		t.Fatalf("resume: %+v", got)
	}
	var procs struct {
		Processes []struct {
			Tag string `json:"tag"`
		} `json:"processes"`
	}
	c.want(c.do("GET", "/v1/capsules/"+sb.ID+"/processes", creds{key: key}, nil), 200).json(t, &procs)
	if !strings.Contains(fmt.Sprint(procs.Processes), "sleeper") {
		t.Fatalf("background process lost across pause: %+v", procs)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID+"/processes/sleeper", creds{key: key}, nil), 204)
	// Metrics run on across the pause: what was stored before it, then the
	// host's new samples.
	resumedAt := time.Now()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		c.want(c.do("GET", "/v1/capsules/"+sb.ID+"/metrics?range=10m", creds{key: key}, nil), 200).json(t, &m)
		if n := len(m.Points); n > 1 && m.Points[0].Timestamp <= sampledAt && m.Points[n-1].TimestampMs >= resumedAt.UnixMilli() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics across a pause (stored at %d, resumed at %d): %+v", sampledAt, resumedAt.Unix(), m)
		}
	}

	// Snapshot to a template; a capsule from it has the file.
	var tpl struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	c.want(c.do("POST", "/v1/snapshots", creds{key: key}, map[string]string{"sandbox_id": sb.ID, "name": "with-note"}), 201).json(t, &tpl)
	if tpl.Type != "snapshot" {
		t.Fatalf("snapshot: %+v", tpl)
	}
	c.want(c.do("POST", "/v1/snapshots", creds{key: key}, map[string]string{"sandbox_id": sb.ID, "name": "with-note"}), 409)
	var child capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"template": "with-note", "memory_mb": 256}), 201).json(t, &child)
	if out, _ := c.exec(key, child.ID, "cat", "/home/user/note.txt"); out != "kept across pause" {
		t.Fatalf("capsule from snapshot: %q", out)
	}

	// Destroy: the record says stopped and the host has nothing left.
	for _, id := range []string{sb.ID, child.ID} {
		c.want(c.do("DELETE", "/v1/capsules/"+id, creds{key: key}, nil), 204)
		c.want(c.do("GET", "/v1/capsules/"+id, creds{key: key}, nil), 200).json(t, &got)
		if got.Status != "stopped" {
			t.Fatalf("destroy %s: %+v", id, got)
		}
	}
	c.want(c.do("DELETE", "/v1/snapshots/with-note", creds{key: key}, nil), 204)
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/exec", creds{key: key}, map[string]any{"cmd": "true"}), 409)
}

// The reconciler enforces timeouts and fixes drift between the database
// and the host.
func TestReconcilerWithARealAgent(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	c.startAgent(admin)
	key := c.apiKey(admin)
	var idle, lost capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256, "timeout_sec": 60}), 201).json(t, &idle)
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &lost)
	// The idle capsule's last activity is long ago; the other vanishes from the database's view of the host.
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE sandboxes SET last_active_at = now() - interval '2 minutes' WHERE id = $1", idle.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.st.Pool.Exec(t.Context(), "DELETE FROM sandboxes WHERE id = $1", lost.ID); err != nil {
		t.Fatal(err)
	}
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log}
	if ran, err := rec.Pass(context.Background()); err != nil || !ran {
		t.Fatalf("pass: %v %v", ran, err)
	}
	var got capsuleOut
	c.want(c.do("GET", "/v1/capsules/"+idle.ID, creds{key: key}, nil), 200).json(t, &got)
	if got.Status != "paused" {
		t.Fatalf("idle capsule after its timeout: %s", got.Status)
	}
	// The unrecorded VM was destroyed on the host; a second pass finds no drift.
	h, _ := c.st.Host(t.Context(), *mustHost(t, c, idle.ID))
	ag := c.srv.agents.Get(h.ID, *h.Address, *h.AgentToken)
	list, err := ag.ListSandboxes(context.Background(), connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list.Msg.GetSandboxes() {
		if s.GetId() == lost.ID {
			t.Fatalf("the VM without a record is still on the host (%v)", s.GetState())
		}
	}
	if ran, err := rec.Pass(context.Background()); err != nil || !ran {
		t.Fatalf("second pass: %v %v", ran, err)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+idle.ID, creds{key: key}, nil), 204)

	// A capsule whose VM dies on the host: the agent notices, and the next
	// pass marks it error with the host's reason, then clears it there.
	var doomed capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &doomed)
	if err := exec.Command("pkill", "-KILL", "-f", "qemu-system.*"+doomed.ID).Run(); err != nil {
		t.Fatalf("kill the capsule's VMM: %v", err)
	}
	var failed struct {
		Status string `json:"status"`
		Reason string `json:"status_reason"`
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		if _, err := rec.Pass(context.Background()); err != nil {
			t.Fatal(err)
		}
		c.want(c.do("GET", "/v1/capsules/"+doomed.ID, creds{key: key}, nil), 200).json(t, &failed)
		if failed.Status == "error" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the capsule whose VM died is still %q", failed.Status)
		}
	}
	if !strings.Contains(failed.Reason, "exited unexpectedly") {
		t.Fatalf("reason: %q", failed.Reason)
	}
	if _, err := rec.Pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	list, err = ag.ListSandboxes(context.Background(), connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list.Msg.GetSandboxes() {
		if s.GetId() == doomed.ID {
			t.Fatalf("the failed capsule is still on the host (%v)", s.GetState())
		}
	}
}

// mustAgentDir is the WRENN_DIR of the test's agent for a host.
func mustAgentDir(t *testing.T, c *cp, hostID string) string {
	t.Helper()
	if c.agentDirs == nil || c.agentDirs[hostID] == "" {
		t.Fatalf("no agent directory known for %s", hostID)
	}
	return c.agentDirs[hostID]
}

// hostAddress is where the control plane reaches a host.
func (c *cp) hostAddress(hostID string) string {
	h, err := c.st.Host(context.Background(), hostID)
	if err != nil || h.Address == nil {
		return ""
	}
	return *h.Address
}

// hostToken is the credential the control plane holds for a host.
func (c *cp) hostToken(hostID string) string {
	h, err := c.st.Host(context.Background(), hostID)
	if err != nil || h.AgentToken == nil {
		return ""
	}
	return *h.AgentToken
}

func mustHost(t *testing.T, c *cp, id string) *string {
	sb, err := c.st.Sandbox(t.Context(), "", id)
	if err != nil {
		t.Fatal(err)
	}
	return sb.HostID
}

// A capsule whose timeout passes while its agent is down is paused once
// the agent is back; in between it is left as it was, not failed.
func TestTimeoutWhileAgentDown(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	a := c.startAgentProc(admin)
	key := c.apiKey(admin)
	var sb capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256, "timeout_sec": 60}), 201).json(t, &sb)
	c.exec(key, sb.ID, "/bin/sh", "-c", "echo remembered > /tmp/mark")

	a.stop()
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE sandboxes SET last_active_at = now() - interval '5 minutes' WHERE id = $1", sb.ID); err != nil {
		t.Fatal(err)
	}
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log}
	if _, err := rec.Pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	var got capsuleOut
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
	if got.Status != "running" {
		t.Fatalf("while its agent is down the capsule became %s", got.Status)
	}

	a.restart(admin) // the agent re-adopts the VM that kept running
	if _, err := rec.Pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("GET", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 200).json(t, &got)
	if got.Status != "paused" {
		t.Fatalf("after the agent came back: %s, want paused", got.Status)
	}
	c.want(c.do("POST", "/v1/capsules/"+sb.ID+"/resume", creds{key: key}, nil), 202)
	if out, _ := c.exec(key, sb.ID, "cat", "/tmp/mark"); out != "remembered\n" {
		t.Fatalf("after resume: %q", out)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+sb.ID, creds{key: key}, nil), 204)
}

// A fork bomb and a memory hog in one capsule disturb neither another
// capsule nor the agent: each is bounded by its own VM (vCPUs, memory).
func TestNoisyNeighbour(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	c.startAgent(admin)
	key := c.apiKey(admin)
	var noisy, quiet capsuleOut
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &noisy)
	c.want(c.do("POST", "/v1/capsules?wait=true", creds{key: key}, map[string]any{"memory_mb": 256}), 201).json(t, &quiet)

	// As root in the guest, so the guest's own limits for users do not stop them.
	for _, attack := range []string{
		"bomb() { bomb | bomb & }; bomb",
		"head -c 2000000000 /dev/zero | tail > /dev/null",
	} {
		c.want(c.do("POST", "/v1/capsules/"+noisy.ID+"/exec", creds{key: key}, map[string]any{"cmd": "/bin/sh", "args": []string{"-c", attack},
			"user": "root", "background": true}), 202)
	}
	time.Sleep(3 * time.Second) // let them take what they can
	// The attack is real: the noisy VM's vCPU is busy on the host (in one
	// of three windows: on a 2-core machine other suites take their share).
	busy := 0.0
	for range 3 {
		if busy = max(busy, vmmCPU(t, noisy.ID, 2*time.Second)); busy >= 0.5 {
			break
		}
	}
	if busy < 0.5 {
		t.Fatalf("the noisy capsule's VMM used at most %.0f%% of a core; the attack did not run", busy*100)
	}

	for i := range 3 {
		start := time.Now()
		out, code := c.exec(key, quiet.ID, "echo", "still here")
		if out != "still here\n" || code != 0 {
			t.Fatalf("the quiet capsule, round %d: %q %d", i, out, code)
		}
		t.Logf("quiet capsule answered in %s", time.Since(start).Round(time.Millisecond))
		var h struct{ Status string }
		c.want(c.do("GET", "/v1/hosts/"+*mustHost(t, c, quiet.ID), creds{jwt: admin.jwt}, nil), 200).json(t, &h)
		if h.Status != "online" {
			t.Fatalf("the host is %s while a neighbour misbehaves", h.Status)
		}
	}
	// The noisy capsule is still under the platform's control.
	var got capsuleOut
	c.want(c.do("DELETE", "/v1/capsules/"+noisy.ID, creds{key: key}, nil), 204)
	c.want(c.do("GET", "/v1/capsules/"+noisy.ID, creds{key: key}, nil), 200).json(t, &got)
	if got.Status != "stopped" {
		t.Fatalf("destroying the noisy capsule: %+v", got)
	}
	c.want(c.do("DELETE", "/v1/capsules/"+quiet.ID, creds{key: key}, nil), 204)
}

// vmmCPU measures the share of one core a capsule's QEMU uses over d.
func vmmCPU(t *testing.T, id string, d time.Duration) float64 {
	t.Helper()
	out, err := exec.Command("pgrep", "-f", "qemu-system.*-name "+id).Output()
	if err != nil {
		t.Fatalf("no QEMU for %s: %v", id, err)
	}
	pid, _ := strconv.Atoi(strings.Fields(string(out))[0])
	ticks := func() float64 { return float64(procfs.CPUTicks(pid)) }
	before := ticks()
	time.Sleep(d)
	return (ticks() - before) / 100 / d.Seconds()
}
