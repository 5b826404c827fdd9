package server_test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/proxy"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/agent/server"
	"github.com/wrenn/wrenn/internal/agent/standin"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

// The agent's RPC server in this process, over HTTP as the control plane
// calls it, on the stand-in host (see package standin): the RPCs' checks,
// error codes and bounds. The same calls against real VMs are in package
// agenttest.

const tpl = "tiny"

type agent struct {
	client hostagentv2connect.HostAgentServiceClient
	url    string
	drv    *standin.Driver
	http   *http.Client
}

func newAgent(t *testing.T, tokens func() (string, string)) *agent {
	t.Helper()
	dir := t.TempDir()
	if err := standin.PrepareDir(context.Background(), dir, tpl, 8); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	n := &standin.Network{Base: netip.MustParseAddr("127.91.0.0")}
	d := &standin.Driver{Net: n}
	t.Cleanup(d.Close)
	m := sandbox.New(sandbox.Config{
		WrennDir: dir, Driver: d, Disks: disk.SparseCopy{}, Net: n, Log: log,
		HostMemoryMiB: 4096, MinFreeMiB: 1, Slots: network.SlotRange{First: 1, Last: 16}, ReapInterval: time.Hour,
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	h := server.Handler(ctx, server.Config{Manager: m, Tokens: tokens, Log: log, WrennDir: dir, VMM: d.Name(), Version: "test"})
	ts := httptest.NewUnstartedServer(h)
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	ts.Config.Protocols = &protocols
	ts.Start()
	t.Cleanup(ts.Close)
	hc := &http.Client{Transport: &http.Transport{Protocols: &protocols}}
	a := &agent{url: ts.URL, drv: d, http: hc}
	a.client = a.as("current")
	return a
}

// as is a client that presents token, on every call and stream.
func (a *agent) as(token string) hostagentv2connect.HostAgentServiceClient {
	hc := &http.Client{Transport: bearer{token, a.http.Transport}}
	return hostagentv2connect.NewHostAgentServiceClient(hc, a.url, connect.WithSendMaxBytes(64<<20), connect.WithReadMaxBytes(64<<20))
}

type bearer struct {
	token string
	next  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

func rotating() (string, string) { return "current", "previous" }

func (a *agent) create(t *testing.T, id string) *pb.Sandbox {
	t.Helper()
	res, err := a.client.CreateSandbox(context.Background(), connect.NewRequest(&pb.CreateSandboxRequest{
		Id: id, Template: tpl, Vcpus: 1, MemoryMib: 256, TimeoutSeconds: 600, EnvVars: map[string]string{"WHO": "tester"},
	}))
	if err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	if res.Msg.GetEnvdAccessToken() == "" {
		t.Error("no envd token in the create's answer")
	}
	return res.Msg.GetSandbox()
}

func code(err error) connect.Code { return connect.CodeOf(err) }

func TestOnlyTheHostTokensAreAccepted(t *testing.T) {
	a := newAgent(t, rotating)
	ctx := context.Background()
	for _, tok := range []string{"current", "previous"} {
		if _, err := a.as(tok).ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{})); err != nil {
			t.Errorf("token %q: %v", tok, err)
		}
	}
	for _, tok := range []string{"", "wrong", "Current", "current2"} {
		_, err := a.as(tok).ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
		if code(err) != connect.CodeUnauthenticated {
			t.Errorf("token %q: %v, want unauthenticated", tok, err)
		}
	}
	// No token configured accepts nobody, not an empty header.
	none := newAgent(t, func() (string, string) { return "", "" })
	if _, err := none.as("").ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{})); code(err) != connect.CodeUnauthenticated {
		t.Errorf("an agent with no token let in an empty one: %v", err)
	}
}

// tunnel asks the agent for a tunnel into a sandbox port, as the control
// plane's ingress does, and returns the answer and the connection.
func (a *agent) tunnel(t *testing.T, target, token string) (*http.Response, net.Conn) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(a.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	req := &http.Request{Method: http.MethodConnect, Host: target, URL: &url.URL{Opaque: target}, Header: http.Header{}}
	if token != "" {
		req.Header.Set(proxy.TokenHeader, "Bearer "+token)
	}
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatal(err)
	}
	return res, &bufferedConn{Conn: conn, r: br}
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func TestTunnelsIntoSandboxPorts(t *testing.T) {
	a := newAgent(t, rotating)
	a.create(t, "sb-tunnel")
	for _, tok := range []string{"", "wrong"} {
		if res, _ := a.tunnel(t, "sb-tunnel:49983", tok); res.StatusCode != http.StatusUnauthorized {
			t.Errorf("a tunnel with token %q: %s", tok, res.Status)
		}
	}
	if res, _ := a.tunnel(t, "sb-nobody:80", "current"); res.StatusCode != http.StatusNotFound {
		t.Errorf("a tunnel into no sandbox: %s", res.Status)
	}
	if res, _ := a.tunnel(t, "sb-tunnel:1", "current"); res.StatusCode != http.StatusBadGateway {
		t.Errorf("a tunnel to a closed port: %s", res.Status)
	}
	if res, _ := a.tunnel(t, "sb-tunnel:70000", "current"); res.StatusCode != http.StatusBadRequest {
		t.Errorf("a tunnel to port 70000: %s", res.Status)
	}
	// envd's own port, spoken to over the tunnel as any server in the
	// sandbox would be.
	res, conn := a.tunnel(t, "sb-tunnel:49983", "current")
	if res.StatusCode != http.StatusOK {
		t.Fatalf("tunnel: %s", res.Status)
	}
	if _, err := io.WriteString(conn, "GET /health HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	health, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	health.Body.Close()
	if health.StatusCode/100 != 2 {
		t.Errorf("envd's /health over the tunnel: %s", health.Status)
	}
	// A paused sandbox has no ports to reach.
	if _, err := a.client.PauseSandbox(context.Background(), connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-tunnel"})); err != nil {
		t.Fatal(err)
	}
	if res, _ := a.tunnel(t, "sb-tunnel:49983", "current"); res.StatusCode != http.StatusConflict {
		t.Errorf("a tunnel into a paused sandbox: %s", res.Status)
	}
}

func TestSandboxLifecycleOverRPC(t *testing.T) {
	a := newAgent(t, rotating)
	ctx := context.Background()
	sb := a.create(t, "sb-rpc")
	if sb.GetState() != pb.SandboxState_SANDBOX_STATE_RUNNING || sb.GetAddress() == "" {
		t.Fatalf("created: %v", sb)
	}
	exec, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: "sb-rpc", Cmd: "/bin/sh", Args: []string{"-c", "echo $WHO; echo oops >&2; exit 3"}}))
	if err != nil {
		t.Fatal(err)
	}
	if string(exec.Msg.GetStdout()) != "tester\n" || string(exec.Msg.GetStderr()) != "oops\n" || exec.Msg.GetExitCode() != 3 {
		t.Errorf("exec: %q %q %d", exec.Msg.GetStdout(), exec.Msg.GetStderr(), exec.Msg.GetExitCode())
	}
	// A command past its timeout is killed and says so, with its output.
	slow, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: "sb-rpc", Cmd: "/bin/sh", Args: []string{"-c", "echo started; sleep 30"}, TimeoutSeconds: 1}))
	if err != nil {
		t.Errorf("timed-out exec: %v", err)
	} else if !slow.Msg.GetTimedOut() || string(slow.Msg.GetStdout()) != "started\n" {
		t.Errorf("timed-out exec: %v", slow.Msg)
	}

	// Files go through envd (which, standing in, writes on this host).
	path := filepath.Join(t.TempDir(), "note.txt")
	if _, err := a.client.WriteFile(ctx, connect.NewRequest(&pb.WriteFileRequest{SandboxId: "sb-rpc", Path: path, Content: []byte("kept")})); err != nil {
		t.Fatal(err)
	}
	read, err := a.client.ReadFile(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: "sb-rpc", Path: path}))
	if err != nil || string(read.Msg.GetContent()) != "kept" {
		t.Errorf("read back: %q, %v", read.Msg.GetContent(), err)
	}
	if _, err := a.client.ReadFile(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: "sb-rpc", Path: path + ".missing"})); code(err) != connect.CodeNotFound {
		t.Errorf("a missing file: %v, want not found", err)
	}

	streamed, err := a.client.ExecStream(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: "sb-rpc", Cmd: "/bin/sh", Args: []string{"-c", "echo one; echo two"}}))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	exit := int32(-1)
	for streamed.Receive() {
		out.Write(streamed.Msg().GetStdout())
		if e, ok := streamed.Msg().GetEvent().(*pb.ExecStreamResponse_ExitCode); ok {
			exit = e.ExitCode
		}
	}
	if streamed.Err() != nil || out.String() != "one\ntwo\n" || exit != 0 {
		t.Errorf("stream: %q exit %d, %v", out.String(), exit, streamed.Err())
	}

	paused, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-rpc"}))
	if err != nil || paused.Msg.GetSandbox().GetState() != pb.SandboxState_SANDBOX_STATE_PAUSED {
		t.Fatalf("pause: %v, %v", paused, err)
	}
	if _, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: "sb-rpc", Cmd: "true"})); code(err) != connect.CodeFailedPrecondition {
		t.Errorf("exec in a paused sandbox: %v, want failed precondition", err)
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: "sb-rpc"})); err != nil {
		t.Fatal(err)
	}
	got, err := a.client.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: "sb-rpc"}))
	if err != nil || got.Msg.GetSandbox().GetState() != pb.SandboxState_SANDBOX_STATE_RUNNING {
		t.Fatalf("after resume: %v, %v", got, err)
	}
	list, err := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil || len(list.Msg.GetSandboxes()) != 1 {
		t.Errorf("list: %v, %v", list, err)
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: "sb-rpc"})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: "sb-rpc"})); code(err) != connect.CodeNotFound {
		t.Errorf("get after destroy: %v", err)
	}
	if vms := a.drv.Running(); len(vms) != 0 {
		t.Errorf("VMs left after destroy: %v", vms)
	}
}

func TestErrorsHaveTheCodesTheControlPlaneActsOn(t *testing.T) {
	a := newAgent(t, rotating)
	ctx := context.Background()
	a.create(t, "sb-codes")
	for name, tc := range map[string]struct {
		call func() error
		want connect.Code
	}{
		"unknown template": {func() error {
			_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Template: "nope", Vcpus: 1, MemoryMib: 256}))
			return err
		}, connect.CodeInvalidArgument},
		"same id twice": {func() error {
			_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: "sb-codes", Template: tpl, Vcpus: 1, MemoryMib: 256}))
			return err
		}, connect.CodeAlreadyExists},
		"too much memory": {func() error {
			_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Template: tpl, Vcpus: 1, MemoryMib: 4000}))
			return err
		}, connect.CodeResourceExhausted},
		"negative timeout": {func() error {
			_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Template: tpl, Vcpus: 1, MemoryMib: 256, TimeoutSeconds: -1}))
			return err
		}, connect.CodeInvalidArgument},
		"bad egress": {func() error {
			_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Template: tpl, Vcpus: 1, MemoryMib: 256,
				Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_LIST, AllowCidrs: []string{"not-a-cidr"}}}))
			return err
		}, connect.CodeInvalidArgument},
		"unknown sandbox": {func() error {
			_, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-nobody"}))
			return err
		}, connect.CodeNotFound},
		"exec of nothing": {func() error {
			_, err := a.client.Exec(ctx, connect.NewRequest(&pb.ExecRequest{SandboxId: "sb-codes"}))
			return err
		}, connect.CodeInvalidArgument},
		"file over the bound": {func() error {
			_, err := a.client.WriteFile(ctx, connect.NewRequest(&pb.WriteFileRequest{SandboxId: "sb-codes", Path: "/tmp/big", Content: make([]byte, 6<<20)}))
			return err
		}, connect.CodeResourceExhausted},
	} {
		if err := tc.call(); code(err) != tc.want {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	// Nothing half made stays from the refused creates.
	list, err := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	if err != nil || len(list.Msg.GetSandboxes()) != 1 {
		t.Errorf("after refused creates: %v, %v", list, err)
	}
}

func TestABusySandboxAnswersUnavailableAtTheCallersDeadline(t *testing.T) {
	a := newAgent(t, rotating)
	booting, release := make(chan struct{}), make(chan struct{})
	a.drv.BeforeBoot = func(ctx context.Context, _ vmm.Spec) error {
		close(booting)
		<-release
		return nil
	}
	done := make(chan error, 1)
	go func() {
		_, err := a.client.CreateSandbox(context.Background(), connect.NewRequest(&pb.CreateSandboxRequest{Id: "sb-busy", Template: tpl, Vcpus: 1, MemoryMib: 256}))
		done <- err
	}()
	<-booting
	// The deadline travels in the request: the agent stops waiting for
	// the sandbox's lock at it (unavailable), or the client gives up.
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-busy"}))
	if c := code(err); c != connect.CodeUnavailable && c != connect.CodeDeadlineExceeded {
		t.Errorf("pause during a create: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the pause waited %v behind the create", took)
	}
	got, err := a.client.GetSandbox(context.Background(), connect.NewRequest(&pb.GetSandboxRequest{Id: "sb-busy"}))
	if st := got.Msg.GetSandbox().GetState(); err != nil || st != pb.SandboxState_SANDBOX_STATE_PENDING && st != pb.SandboxState_SANDBOX_STATE_STARTING {
		t.Errorf("get during the create: %v, %v", got, err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestHostInfoNamesTheTemplates(t *testing.T) {
	a := newAgent(t, rotating)
	res, err := a.client.GetHostInfo(context.Background(), connect.NewRequest(&pb.GetHostInfoRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(res.Msg.GetTemplates(), ",") != tpl || res.Msg.GetVmm() != "standin" || res.Msg.GetDiskBytes() == 0 {
		t.Errorf("host info: %v", res.Msg)
	}
}
