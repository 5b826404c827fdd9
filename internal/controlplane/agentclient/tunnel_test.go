package agentclient

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/netip"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/proxy"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
)

// These tests run tunnels through the agent's real proxy (package
// internal/agent/proxy) on loopback, to a server standing in for one in
// a sandbox; the sandbox's address is 127.0.0.1.

const rigToken = "the-host-token"

type oneSandbox struct{}

func (oneSandbox) Peek(id string) (sandbox.Record, error) {
	if id != "sb1" {
		return sandbox.Record{}, sandbox.ErrNotFound
	}
	return sandbox.Record{ID: id, State: sandbox.Running, Net: network.Allocation{SandboxIP: netip.MustParseAddr("127.0.0.1")}}, nil
}

type rig struct {
	pool   *Pool
	agent  string
	port   int
	opened atomic.Int64 // connections the sandbox's server accepted: one per tunnel
	closed atomic.Int64 // and saw closed
}

func newRig(t *testing.T) *rig {
	t.Helper()
	h := proxy.New(oneSandbox{}, func() (string, string) { return rigToken, "" }, slog.New(slog.DiscardHandler))
	agent := httptest.NewServer(h)
	t.Cleanup(agent.Close)
	return &rig{pool: &Pool{}, agent: agent.URL}
}

// serve runs handler as the sandbox's HTTP server.
func (r *rig) serve(t *testing.T, handler http.Handler, idle time.Duration) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.port = l.Addr().(*net.TCPAddr).Port
	srv := &http.Server{Handler: handler, IdleTimeout: idle, ConnState: func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			r.opened.Add(1)
		case http.StateClosed, http.StateHijacked:
			r.closed.Add(1)
		}
	}}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
}

// serveRaw runs answer on every connection the sandbox's server accepts,
// after reading one request's headers.
func (r *rig) serveRaw(t *testing.T, answer func(c net.Conn)) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	r.port = l.Addr().(*net.TCPAddr).Port
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			r.opened.Add(1)
			go func() {
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				answer(c)
			}()
		}
	}()
}

func (r *rig) transport() http.RoundTripper {
	return r.pool.Tunnel("h1", r.agent, rigToken, "sb1", r.port)
}

func get(t *testing.T, rt http.RoundTripper, method, path string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://sb1"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return res, string(body)
}

func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !ok(); {
		if time.Now().After(deadline) {
			t.Fatalf("not so after 5 s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTunnelKeepsConnections(t *testing.T) {
	r := newRig(t)
	r.serve(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		switch req.URL.Path {
		case "/fixed":
			w.Header().Set("Content-Length", "5")
			_, _ = io.WriteString(w, "hello")
		case "/chunked":
			for i := range 3 {
				fmt.Fprintf(w, "part %d;", i)
				w.(http.Flusher).Flush()
			}
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		default:
			http.NotFound(w, req)
		}
	}), 0)
	rt := r.transport()
	for i := range 10 {
		if res, body := get(t, rt, "GET", "/fixed"); res.StatusCode != 200 || body != "hello" {
			t.Fatalf("GET /fixed #%d: %d %q", i, res.StatusCode, body)
		}
		if res, body := get(t, rt, "GET", "/chunked"); res.StatusCode != 200 || body != "part 0;part 1;part 2;" || res.ContentLength != -1 {
			t.Fatalf("GET /chunked #%d: %d %q (length %d)", i, res.StatusCode, body, res.ContentLength)
		}
		if res, body := get(t, rt, "HEAD", "/fixed"); res.StatusCode != 200 || body != "" || res.ContentLength != 5 {
			t.Fatalf("HEAD /fixed #%d: %d %q (length %d)", i, res.StatusCode, body, res.ContentLength)
		}
		if res, _ := get(t, rt, "GET", "/empty"); res.StatusCode != http.StatusNoContent {
			t.Fatalf("GET /empty #%d: %d", i, res.StatusCode)
		}
		if res, _ := get(t, rt, "OPTIONS", "/nothing"); res.StatusCode != http.StatusNotFound {
			t.Fatalf("OPTIONS /nothing #%d: %d", i, res.StatusCode)
		}
	}
	if n := r.opened.Load(); n != 1 {
		t.Fatalf("50 requests one after another opened %d tunnels, want 1", n)
	}
	// What a client tracing its requests sees.
	var mu sync.Mutex // the transport calls these from its own goroutines
	var seen []string
	note := func(s string) { mu.Lock(); seen = append(seen, s); mu.Unlock() }
	trace := &httptrace.ClientTrace{
		GotConn:              func(i httptrace.GotConnInfo) { note(fmt.Sprintf("conn reused=%v", i.Reused)) },
		WroteRequest:         func(httptrace.WroteRequestInfo) { note("wrote") },
		GotFirstResponseByte: func() { note("first byte") },
	}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", "http://sb1/fixed", nil)
	res, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	mu.Lock()
	defer mu.Unlock()
	if got := strings.Join(seen, ", "); got != "conn reused=true, wrote, first byte" {
		t.Fatalf("the trace saw %q", got)
	}
}

func TestTunnelBodiesAndUpgrades(t *testing.T) {
	r := newRig(t)
	r.serve(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Header.Get("Upgrade") == "echo" {
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
			_ = brw.Flush()
			_, _ = io.Copy(c, brw)
			return
		}
		body, _ := io.ReadAll(req.Body)
		fmt.Fprintf(w, "%s %s", req.Method, body)
	}), 0)
	rt := r.transport()
	for _, method := range []string{"POST", "PUT", "DELETE"} {
		req, _ := http.NewRequest(method, "http://sb1/", strings.NewReader("payload"))
		res, err := rt.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(body) != method+" payload" {
			t.Fatalf("%s: the server got %q", method, body)
		}
	}
	req, _ := http.NewRequest("GET", "http://sb1/", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "echo")
	res, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	rw, ok := res.Body.(io.ReadWriteCloser)
	if res.StatusCode != http.StatusSwitchingProtocols || !ok {
		t.Fatalf("upgrade: %d, writable body %v", res.StatusCode, ok)
	}
	if _, err := io.WriteString(rw, "ping"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(rw, got); err != nil || string(got) != "ping" {
		t.Fatalf("the upgraded connection echoed %q, %v", got, err)
	}
}

func TestTunnelClosedByTheServerIsNotReused(t *testing.T) {
	handler := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == "/close" {
			w.Header().Set("Connection", "close")
		}
		if req.URL.Path == "/big" {
			_, _ = w.Write(bytes.Repeat([]byte("x"), 1<<20))
			return
		}
		_, _ = io.WriteString(w, "ok")
	})
	r := newRig(t)
	r.serve(t, handler, 150*time.Millisecond)
	rt := r.transport()

	// The server's keep-alive ends (as Node's does after 5 s): the kept
	// tunnel is closed under us, and the next request goes on a new one.
	get(t, rt, "GET", "/")
	eventually(t, "the server closed its idle connection", func() bool { return r.closed.Load() == 1 })
	time.Sleep(50 * time.Millisecond) // the agent passes the close on
	if res, body := get(t, rt, "GET", "/"); res.StatusCode != 200 || body != "ok" {
		t.Fatalf("after the server closed the kept tunnel: %d %q", res.StatusCode, body)
	}
	if n := r.opened.Load(); n != 2 {
		t.Fatalf("opened %d tunnels, want 2", n)
	}

	// A server that keeps its connections for as long as they last.
	r = newRig(t)
	r.serve(t, handler, 0)
	rt = r.transport()
	get(t, rt, "GET", "/")

	// Connection: close is obeyed.
	get(t, rt, "GET", "/close")
	get(t, rt, "GET", "/")
	if n := r.opened.Load(); n != 2 {
		t.Fatalf("after Connection: close, opened %d tunnels, want 2", n)
	}

	// A body closed before its end takes its tunnel with it.
	req, _ := http.NewRequest("GET", "http://sb1/big", nil)
	res, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(res.Body, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if _, err := res.Body.Read(make([]byte, 1)); err == nil {
		t.Fatal("a closed body still reads")
	}
	get(t, rt, "GET", "/")
	if n := r.opened.Load(); n != 3 {
		t.Fatalf("after a body left unread, opened %d tunnels, want 3", n)
	}
}

func TestTunnelBoundsWhatTheServerSends(t *testing.T) {
	cases := []struct {
		name   string
		answer string
		want   string // in the error
	}{
		{"headers over 1 MiB", "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", 2<<20) + "\r\n\r\n", "headers exceeded"},
		{"endless 1xx", strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </"+strings.Repeat("a", 100<<10)+".css>\r\n\r\n", 15), "headers exceeded"},
		{"not HTTP", "SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed HTTP"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := newRig(t)
			r.serveRaw(t, func(conn net.Conn) { _, _ = io.WriteString(conn, c.answer) })
			req, _ := http.NewRequest("GET", "http://sb1/", nil)
			res, err := r.transport().RoundTrip(req)
			if err == nil {
				res.Body.Close()
				t.Fatalf("answered %d", res.StatusCode)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

func TestTunnelPassesEarlyHints(t *testing.T) {
	r := newRig(t)
	r.serveRaw(t, func(conn net.Conn) {
		_, _ = io.WriteString(conn, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	var hints []string
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
		hints = append(hints, fmt.Sprintf("%d %s", code, h.Get("Link")))
		return nil
	}}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", "http://sb1/", nil)
	res, err := r.transport().RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != 200 || string(body) != "ok" {
		t.Fatalf("%d %q %v", res.StatusCode, body, err)
	}
	if len(hints) != 1 || hints[0] != "103 </a.css>; rel=preload" {
		t.Fatalf("1xx answers seen: %q", hints)
	}
}

func TestTunnelCancelledRequestEndsItsTunnel(t *testing.T) {
	r := newRig(t)
	gone := make(chan struct{})
	r.serve(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		<-req.Context().Done() // the connection closed
		close(gone)
	}), 0)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://sb1/", nil)
	start := time.Now()
	_, err := r.transport().RoundTrip(req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a request past its deadline answered %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the request ended %v after its deadline", took)
	}
	select {
	case <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the server in the sandbox never saw the tunnel close")
	}
}

func TestTunnelRefusalsAndBadHeaders(t *testing.T) {
	r := newRig(t)
	seen := make(chan http.Header, 10)
	r.serve(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) { seen <- req.Header }), 0)

	req, _ := http.NewRequest("GET", "http://x/", nil)
	_, err := r.pool.Tunnel("h1", r.agent, rigToken, "nope", r.port).RoundTrip(req)
	var refused *TunnelRefused
	if !errors.As(err, &refused) || refused.Status != http.StatusNotFound || !strings.Contains(string(refused.Body), "no sandbox nope") {
		t.Fatalf("a tunnel to an unknown sandbox: %v", err)
	}
	_, err = r.pool.Tunnel("h1", r.agent, "wrong", "sb1", r.port).RoundTrip(req)
	if !errors.As(err, &refused) || refused.Status != http.StatusUnauthorized {
		t.Fatalf("a tunnel with a wrong token: %v", err)
	}

	req.Header["X-Evil"] = []string{"a\r\nInjected: 1"}
	if _, err := r.transport().RoundTrip(req); err == nil || !strings.Contains(err.Error(), "invalid header") {
		t.Fatalf("a header value with a line break: %v", err)
	}
	select {
	case h := <-seen:
		t.Fatalf("the server got a request: %v", h)
	default:
	}
}

func TestForgetTunnels(t *testing.T) {
	r := newRig(t)
	release := make(chan struct{})
	r.serve(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == "/slow" {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			<-release
		}
		_, _ = io.WriteString(w, "ok")
	}), 0)
	rt := r.transport()

	// A request in flight while the sandbox is forgotten (it paused), and
	// an idle tunnel.
	req, _ := http.NewRequest("GET", "http://sb1/slow", nil)
	res, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	get(t, rt, "GET", "/")
	r.pool.ForgetTunnels("sb1")
	eventually(t, "the idle tunnel is closed", func() bool { return r.closed.Load() == 1 })
	close(release)
	if body, err := io.ReadAll(res.Body); err != nil || string(body) != "ok" {
		t.Fatalf("the request in flight: %q %v", body, err)
	}
	res.Body.Close()

	// The next request gets a transport of its own, on a fresh tunnel.
	rt2 := r.transport()
	if rt2 == rt {
		t.Fatal("a forgotten transport is handed out again")
	}
	if res, body := get(t, rt2, "GET", "/"); res.StatusCode != 200 || body != "ok" {
		t.Fatalf("after ForgetTunnels: %d %q", res.StatusCode, body)
	}
	if n := r.opened.Load(); n != 3 {
		t.Fatalf("opened %d tunnels, want 3", n)
	}
}

func TestTunnelConcurrentRequests(t *testing.T) {
	r := newRig(t)
	r.serve(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		_, _ = io.WriteString(w, req.URL.Path)
	}), 0)
	rt := r.transport()
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for g := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				path := fmt.Sprintf("/%d/%d", g, i)
				req, _ := http.NewRequest("GET", "http://sb1"+path, nil)
				res, err := rt.RoundTrip(req)
				if err != nil {
					errs <- err
					return
				}
				body, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil || string(body) != path {
					errs <- fmt.Errorf("%s answered %q, %v", path, body, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Kept tunnels serve what follows.
	opened := r.opened.Load()
	for range 10 {
		get(t, rt, "GET", "/")
	}
	if n := r.opened.Load(); n != opened {
		t.Fatalf("10 requests after the burst opened %d more tunnels", n-opened)
	}
}
