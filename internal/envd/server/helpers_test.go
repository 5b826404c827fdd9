package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/envd/server"
	"github.com/wrenn/wrenn/internal/testutil/freeport"
	fspb "github.com/wrenn/wrenn/proto/envd/filesystem"
	"github.com/wrenn/wrenn/proto/envd/filesystem/filesystemconnect"
	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

// harness is a real envd served over loopback HTTP (HTTP/1.1 and h2c).
type harness struct {
	t    *testing.T
	url  string
	srv  *server.Server
	proc processconnect.ProcessClient
	fs   filesystemconnect.FilesystemClient
	http *http.Client
}

func newHarness(t *testing.T, clientOpts ...connect.ClientOption) *harness {
	t.Helper()
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv := server.New(server.Config{Log: log, FallbackUser: me.Username})
	ts := httptest.NewUnstartedServer(srv.Handler())
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	ts.Config.Protocols = &protocols
	ts.Start()
	t.Cleanup(func() {
		srv.Shutdown()
		ts.Close()
	})
	hc := &http.Client{Transport: &http.Transport{}}
	return &harness{
		t: t, url: ts.URL, srv: srv, http: hc,
		proc: processconnect.NewProcessClient(hc, ts.URL, clientOpts...),
		fs:   filesystemconnect.NewFilesystemClient(hc, ts.URL, clientOpts...),
	}
}

// asUser sets the Basic auth header the E2B SDKs use to name the user.
func asUser[T any](req *connect.Request[T], name string) *connect.Request[T] {
	req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(name+":")))
	return req
}

// result is everything a finished process produced.
type result struct {
	pid            uint32
	stdout, stderr bytes.Buffer
	pty            bytes.Buffer
	end            *pb.ProcessEvent_EndEvent
	keepalives     int
}

// collect reads a Start or Connect stream to its end.
func collect(t *testing.T, recv func() bool, msg func() *pb.ProcessEvent, streamErr func() error) *result {
	t.Helper()
	r := &result{}
	for recv() {
		ev := msg()
		switch e := ev.GetEvent().(type) {
		case *pb.ProcessEvent_Start:
			r.pid = e.Start.GetPid()
		case *pb.ProcessEvent_Data:
			r.stdout.Write(e.Data.GetStdout())
			r.stderr.Write(e.Data.GetStderr())
			r.pty.Write(e.Data.GetPty())
		case *pb.ProcessEvent_End:
			r.end = e.End
		case *pb.ProcessEvent_Keepalive:
			r.keepalives++
		}
	}
	if err := streamErr(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if r.end == nil {
		t.Fatal("stream closed without an end event")
	}
	return r
}

// run starts a command and waits for it to end.
func (h *harness) run(ctx context.Context, req *connect.Request[pb.StartRequest]) *result {
	h.t.Helper()
	stream, err := h.proc.Start(ctx, req)
	if err != nil {
		h.t.Fatalf("start %v: %v", req.Msg.GetProcess().GetCmd(), err)
	}
	defer stream.Close()
	return collect(h.t, stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err)
}

func sh(script string) *connect.Request[pb.StartRequest] {
	no := false
	return connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", script}},
		Stdin:   &no,
	})
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// wantCode asserts a Connect error code.
func wantCode(t *testing.T, err error, code connect.Code) {
	t.Helper()
	if err == nil {
		t.Fatalf("want %v error, got success", code)
	}
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != code {
		t.Fatalf("want %v error, got %v", code, err)
	}
}

// startErr reads a Start stream until its error (the server reports start
// failures as the stream's error).
func (h *harness) startErr(ctx context.Context, req *connect.Request[pb.StartRequest]) error {
	stream, err := h.proc.Start(ctx, req)
	if err != nil {
		return err
	}
	defer stream.Close()
	for stream.Receive() {
	}
	return stream.Err()
}

func (h *harness) stat(ctx context.Context, path string) (*fspb.EntryInfo, error) {
	res, err := h.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: path}))
	if err != nil {
		return nil, err
	}
	return res.Msg.GetEntry(), nil
}

// h2cClient speaks HTTP/2 without TLS, as gRPC clients do inside a VM network.
func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &p}}
}

// initJSON posts an /init body and expects it to be accepted.
func (h *harness) initJSON(t *testing.T, body, token string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, h.url+"/init", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("X-Access-Token", token)
	}
	res, err := h.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusNoContent {
		msg, _ := io.ReadAll(res.Body)
		t.Fatalf("/init: %d %s", res.StatusCode, msg)
	}
}

func newClientFor(url string) processconnect.ProcessClient {
	return processconnect.NewProcessClient(http.DefaultClient, url)
}

func runOutput(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// startCmd starts a long-running binary and kills it when the test ends.
func startCmd(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	if testing.Verbose() {
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd
}

// envdBinary is built once per test run by TestMain.
var envdBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "envd-test-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	envdBinary = filepath.Join(dir, "envd")
	out, err := exec.Command("go", "build", "-o", envdBinary, "github.com/wrenn/wrenn/cmd/envd").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build envd: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// devEnvd runs the real envd binary in --dev mode and returns its URL and
// process, so tests can measure envd alone.
func devEnvd(t *testing.T, extraArgs ...string) (string, *exec.Cmd) {
	t.Helper()
	port := freeport.Get(t)
	cmd := startCmd(t, envdBinary, append([]string{"--dev", "--port", port}, extraArgs...)...)
	url := "http://127.0.0.1:" + port
	waitUntil(t, func() bool {
		res, err := http.Get(url + "/health")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusNoContent
	})
	return url, cmd
}

// peakRSS is the kernel's high-water mark of a process's resident memory.
func peakRSS(t *testing.T, pid int) uint64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb uint64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}
