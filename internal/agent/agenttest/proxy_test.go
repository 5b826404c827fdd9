package agenttest

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/agent/proxy"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// Servers inside the sandbox, made with socat from the minimal image:
// on 8080 one that answers with the request's headers, on 8081 one that
// accepts an Upgrade and then echoes, as a WebSocket server would after
// its handshake, and on 127.0.0.1:8082 only, one that says where it is.
const guestServers = `cat > /tmp/headers.sh <<'SCRIPT'
#!/bin/bash
body=""
while IFS= read -r line; do [ "$line" = $'\r' ] && break; body+="${line%$'\r'}"$'\n'; done
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
SCRIPT
cat > /tmp/upgrade.sh <<'SCRIPT'
#!/bin/bash
while IFS= read -r line; do [ "$line" = $'\r' ] && break; done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'
exec cat
SCRIPT
cat > /tmp/local.sh <<'SCRIPT'
#!/bin/bash
while IFS= read -r line; do [ "$line" = $'\r' ] && break; done
printf 'HTTP/1.1 200 OK\r\nContent-Length: 18\r\nConnection: close\r\n\r\nhello from lo:8082'
SCRIPT
chmod +x /tmp/headers.sh /tmp/upgrade.sh /tmp/local.sh`

// The agent's proxy lives on its RPC listener: a CONNECT carrying the
// host token (in its own header) becomes a tunnel to a sandbox port, over
// which the server sees exactly what the client sends. It reaches every
// port, envd's and servers bound to the guest's loopback included, and
// closes its tunnels when the sandbox pauses.
func TestProxyHTTPAndUpgrade(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	res, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: "sb-web", Template: "minimal", Vcpus: 1, MemoryMib: 256}))
	if err != nil {
		t.Fatal(err)
	}
	sb, envdToken := res.Msg.GetSandbox(), res.Msg.GetEnvdAccessToken()
	if out, code := a.sh(ctx, sb.GetId(), guestServers); code != 0 {
		t.Fatalf("setup: %q", out)
	}
	for listen, script := range map[string]string{"TCP-LISTEN:8080": "/tmp/headers.sh", "TCP-LISTEN:8081": "/tmp/upgrade.sh", "TCP-LISTEN:8082,bind=127.0.0.1": "/tmp/local.sh"} {
		if _, err := a.client.StartProcess(ctx, connect.NewRequest(&pb.ExecRequest{
			SandboxId: sb.GetId(), Cmd: "socat", Args: []string{listen + ",reuseaddr,fork", "EXEC:" + script},
		})); err != nil {
			t.Fatal(err)
		}
	}
	type call struct {
		port, token string
		header      http.Header
	}
	// tunnel asks the agent for a tunnel to a port of sb, as the control
	// plane does, and returns the connection or the agent's refusal.
	tunnel := func(id string, c call) (net.Conn, *bufio.Reader, *http.Response) {
		t.Helper()
		conn, err := net.Dial("tcp", a.addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		req := "CONNECT " + id + ":" + c.port + " HTTP/1.1\r\nHost: " + id + ":" + c.port + "\r\n"
		if c.token != "" {
			req += proxy.TokenHeader + ": Bearer " + c.token + "\r\n"
		}
		for k, v := range c.header {
			req += k + ": " + v[0] + "\r\n"
		}
		_, _ = io.WriteString(conn, req+"\r\n")
		r := bufio.NewReader(conn)
		res, err := http.ReadResponse(r, &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode != http.StatusOK {
			conn.Close()
			return nil, nil, res
		}
		return conn, r, nil
	}
	// get sends one request through a tunnel; it retries a 502 while the
	// guest's servers may still be starting.
	get := func(c call, path string, retry bool) (int, string) {
		t.Helper()
		deadline := time.Now()
		if retry {
			deadline = deadline.Add(15 * time.Second)
		}
		for {
			conn, r, refused := tunnel(sb.GetId(), c)
			if refused != nil {
				body, _ := io.ReadAll(refused.Body)
				if refused.StatusCode != http.StatusBadGateway || time.Now().After(deadline) {
					return refused.StatusCode, string(body)
				}
				time.Sleep(200 * time.Millisecond)
				continue
			}
			req, _ := http.NewRequest(http.MethodGet, "http://8080-sb-web.wrenn.test"+path, nil)
			req.Header = http.Header{"Authorization": {"Bearer the-apps-own"}, "X-Forwarded-For": {"203.0.113.9"}}
			req.Close = true
			if err := req.Write(conn); err != nil {
				t.Fatal(err)
			}
			res, err := http.ReadResponse(r, req)
			if err != nil {
				conn.Close()
				if time.Now().After(deadline) {
					t.Fatalf("through the tunnel: %v", err)
				}
				time.Sleep(200 * time.Millisecond)
				continue
			}
			body, _ := io.ReadAll(res.Body)
			conn.Close()
			return res.StatusCode, string(body)
		}
	}
	code, body := get(call{port: "8080", token: testToken}, "/hello?x=1", true)
	if code != 200 {
		t.Fatalf("HTTP through the proxy: %d %q", code, body)
	}
	for _, want := range []string{"GET /hello?x=1 HTTP/1.1", "Host: 8080-sb-web.wrenn.test", "Authorization: Bearer the-apps-own", "X-Forwarded-For: 203.0.113.9"} {
		if !strings.Contains(body, want) {
			t.Errorf("the server in the sandbox did not see %q:\n%s", want, body)
		}
	}
	if strings.Contains(body, testToken) || strings.Contains(strings.ToLower(body), "wrenn-") {
		t.Errorf("the host token or the proxy's headers reached the sandbox:\n%s", body)
	}

	// Without the host token, nothing passes, whatever else is sent.
	for name, c := range map[string]call{
		"no token":          {port: "8080"},
		"wrong token":       {port: "8080", token: testToken + "x"},
		"token as RPC auth": {port: "8080", header: http.Header{"Authorization": {"Bearer " + testToken}}},
	} {
		if code, body := get(c, "/", false); code != http.StatusUnauthorized || strings.Contains(body, "Host:") {
			t.Errorf("%s: %d %s", name, code, body)
		}
	}

	// A server bound to the guest's 127.0.0.1 is reachable too.
	if code, body := get(call{port: "8082", token: testToken}, "/", true); code != 200 || body != "hello from lo:8082" {
		out, _ := a.sh(ctx, sb.GetId(), "cat /proc/net/tcp; ip -4 addr; envd --version; ls -la /run/wrenn")
		t.Fatalf("loopback server through the proxy: %d %q\n%s", code, body, out)
	}
	// envd's port passes; envd itself wants its token.
	envd := func(token string) (int, string) {
		conn, r, refused := tunnel(sb.GetId(), call{port: "49983", token: testToken})
		if refused != nil {
			t.Fatalf("tunnel to envd: %d", refused.StatusCode)
		}
		defer conn.Close()
		req, _ := http.NewRequest(http.MethodGet, "http://envd/envs", nil)
		if token != "" {
			req.Header.Set("X-Access-Token", token)
		}
		if err := req.Write(conn); err != nil {
			t.Fatal(err)
		}
		res, err := http.ReadResponse(r, req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(body)
	}
	if code, _ := envd(""); code != http.StatusUnauthorized {
		t.Fatalf("envd without its token answered %d", code)
	}
	code, body = envd(envdToken)
	if code != 200 || !strings.Contains(body, `"WRENN_SANDBOX_ID":"sb-web"`) || !strings.Contains(body, `"E2B_SANDBOX_ID":"sb-web"`) {
		t.Fatalf("envd through the proxy: %d %s", code, body)
	}
	if out, _ := a.sh(ctx, sb.GetId(), `echo "$WRENN_SANDBOX_ID $WRENN_TEMPLATE_ID"; cat /run/wrenn/.WRENN_SANDBOX_ID`); out != "sb-web minimal\nsb-web\n" {
		t.Fatalf("the guest does not know who it is: %q", out)
	}

	// A WebSocket-style upgrade passes both ways, as any bytes do.
	conn, r, refused := tunnel(sb.GetId(), call{port: "8081", token: testToken})
	if refused != nil {
		t.Fatalf("tunnel to 8081: %d", refused.StatusCode)
	}
	defer conn.Close()
	_, _ = io.WriteString(conn, "GET /socket HTTP/1.1\r\nHost: 8081-sb-web.wrenn.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	status, _ := r.ReadString('\n')
	if !strings.Contains(status, "101") {
		t.Fatalf("upgrade answered %q", status)
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil || line == "\r\n" {
			break
		}
	}
	_, _ = io.WriteString(conn, "ping over the tunnel\n")
	echo, err := r.ReadString('\n')
	if err != nil || echo != "ping over the tunnel\n" {
		t.Fatalf("echo through the upgraded connection: %q %v", echo, err)
	}

	if code, _ := get(call{port: "x", token: testToken}, "/", false); code != http.StatusBadRequest {
		t.Errorf("port x: %d", code)
	}
	for port, want := range map[string]int{"0": http.StatusBadRequest, "70000": http.StatusBadRequest, "9999": http.StatusBadGateway} {
		if code, body := get(call{port: port, token: testToken}, "/", false); code != want || !strings.Contains(body, `"message"`) {
			t.Errorf("port %s: %d %s", port, code, body)
		}
	}
	if _, _, refused := tunnel("sb-missing", call{port: "8080", token: testToken}); refused == nil || refused.StatusCode != http.StatusNotFound {
		t.Errorf("unknown sandbox: %v", refused)
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(call{port: "8080", token: testToken}, "/", false); code != http.StatusConflict {
		t.Fatalf("proxy to a paused sandbox: %d", code)
	}
	// The open tunnel into it was closed when it paused.
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("a tunnel into a paused sandbox stayed open")
	}
}
