package server_test

import (
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/envd/process"
)

func TestAccessToken(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)

	// Before /init sets a token, requests need none.
	h.run(ctx, sh("true"))
	h.initJSON(t, `{"accessToken":"s3cret-token"}`, "")

	// RPCs without or with a wrong token are unauthenticated.
	wantCode(t, h.startErr(ctx, sh("true")), connect.CodeUnauthenticated)
	wrong := sh("true")
	wrong.Header().Set("X-Access-Token", "s3cret-tokeX")
	wantCode(t, h.startErr(ctx, wrong), connect.CodeUnauthenticated)
	_, err := h.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)

	right := sh("echo ok")
	right.Header().Set("X-Access-Token", "s3cret-token")
	if r := h.run(ctx, right); r.stdout.String() != "ok\n" {
		t.Fatalf("with token: %q", r.stdout.String())
	}

	// Plain HTTP endpoints answer 401, except /health.
	for _, path := range []string{"/files?path=/etc/hostname", "/metrics", "/envs"} {
		res, err := http.Get(h.url + path)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s without token: %d", path, res.StatusCode)
		}
	}
	res, err := http.Get(h.url + "/health")
	if err != nil || res.StatusCode != http.StatusNoContent {
		t.Fatalf("/health: %v %v", res.StatusCode, err)
	}

	// Changing the token needs the current one.
	req, _ := http.NewRequest(http.MethodPost, h.url+"/init", strings.NewReader(`{"accessToken":"stolen"}`))
	res, err = http.DefaultClient.Do(req)
	if err != nil || res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("/init without token: %v %v", res.StatusCode, err)
	}
	h.initJSON(t, `{"accessToken":"rotated"}`, "s3cret-token")
	wantCode(t, h.startErr(ctx, right), connect.CodeUnauthenticated)
}

func TestInitDefaults(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	dir := t.TempDir()
	h.initJSON(t, `{"envVars":{"A":"1"},"defaultWorkdir":"`+dir+`","timestamp":"`+time.Now().UTC().Format(time.RFC3339Nano)+`"}`, "")
	if r := h.run(ctx, sh("pwd; echo $A")); r.stdout.String() != dir+"\n1\n" {
		t.Fatalf("got %q", r.stdout.String())
	}
	res, err := http.Get(h.url + "/envs")
	if err != nil {
		t.Fatal(err)
	}
	var env map[string]string
	_ = json.NewDecoder(res.Body).Decode(&env)
	res.Body.Close()
	if env["A"] != "1" {
		t.Fatalf("/envs = %v", env)
	}
	if os.Geteuid() == 0 {
		h.initJSON(t, `{"defaultUser":"nobody","defaultWorkdir":"/"}`, "")
		if r := h.run(ctx, sh("id -un")); r.stdout.String() != "nobody\n" {
			t.Fatalf("default user: %q", r.stdout.String())
		}
	}

	for name, body := range map[string]string{
		"not json":         `{`,
		"unknown field":    `{"bogus":1}`,
		"unknown user":     `{"defaultUser":"no-such-user-wrenn"}`,
		"relative workdir": `{"defaultWorkdir":"tmp"}`,
		"bad env name":     `{"envVars":{"A=B":"x"}}`,
		"bad timestamp":    `{"timestamp":"yesterday"}`,
		"bad hostname":     `{"hostname":"-not a host-"}`,
		"too much entropy": `{"entropy":"` + base64.StdEncoding.EncodeToString(make([]byte, 513)) + `"}`,
		"entropy not b64":  `{"entropy":"%%%"}`,
	} {
		res, err := http.Post(h.url+"/init", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusBadRequest || !strings.Contains(string(msg), `"message"`) {
			t.Errorf("%s: %d %s", name, res.StatusCode, msg)
		}
	}
}

func TestMetricsAndSnapshotPrepare(t *testing.T) {
	h := newHarness(t)
	res, err := http.Get(h.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]float64
	if err := json.NewDecoder(res.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if m["cpu_count"] < 1 || m["mem_total"] <= m["mem_used"] || m["mem_used"] <= 0 || m["disk_total"] < m["disk_used"] || m["disk_used"] <= 0 ||
		m["cpu_used_pct"] < 0 || m["cpu_used_pct"] > 100 || time.Since(time.Unix(int64(m["ts"]), 0)) > time.Minute {
		t.Fatalf("metrics %v", m)
	}
	res, err = http.Post(h.url+"/snapshot/prepare", "", nil)
	if err != nil || res.StatusCode != http.StatusNoContent {
		t.Fatalf("/snapshot/prepare: %v %v", res.StatusCode, err)
	}
}

func TestBasicAuthMalformed(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	req := sh("true")
	req.Header().Set("Authorization", "Bearer something")
	wantCode(t, h.startErr(ctx, req), connect.CodeUnauthenticated)
}

// TestDevBinary runs the real envd binary the way a developer does.
func TestDevBinary(t *testing.T) {
	url, cmd := devEnvd(t)
	stream, err := newClientFor(url).Start(testCtx(t, 10*time.Second), sh("echo from-binary"))
	if err != nil {
		t.Fatal(err)
	}
	r := collect(t, stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err)
	if r.stdout.String() != "from-binary\n" {
		t.Fatalf("got %q", r.stdout.String())
	}
	// SIGINT stops it cleanly.
	_ = cmd.Process.Signal(os.Interrupt)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("envd exited with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("envd did not stop on SIGINT")
	}

	if out, err := runOutput(envdBinary, "--port", "99999"); err == nil || !strings.Contains(out, "out of range") {
		t.Fatalf("bad port: %v %s", err, out)
	}
}
