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
	pb "github.com/wrenn/wrenn/proto/hostagent/v1"
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

// The agent's proxy lives on its RPC listener, answers only the host
// token (in its own header, so the client's Authorization reaches the
// sandbox), and reaches every port: envd's, and servers bound to the
// guest's loopback.
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
	// get retries a 502 while the guest's servers may still be starting.
	get := func(c call, path string, retry bool) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+a.addr+path, nil)
		req.Host = "8080-sb-web.wrenn.test"
		for k, v := range c.header {
			req.Header[k] = v
		}
		req.Header.Set(proxy.SandboxHeader, sb.GetId())
		req.Header.Set(proxy.PortHeader, c.port)
		if c.token != "" {
			req.Header.Set(proxy.TokenHeader, "Bearer "+c.token)
		}
		deadline := time.Now()
		if retry {
			deadline = deadline.Add(15 * time.Second)
		}
		for {
			res, err := http.DefaultClient.Do(req)
			if err == nil {
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if res.StatusCode != http.StatusBadGateway || time.Now().After(deadline) {
					return res.StatusCode, string(body)
				}
			} else if time.Now().After(deadline) {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	code, body := get(call{port: "8080", token: testToken, header: http.Header{
		"Authorization": {"Bearer the-apps-own"}, "X-Forwarded-For": {"203.0.113.9"}}}, "/hello?x=1", true)
	if code != 200 {
		t.Fatalf("HTTP through the proxy: %d %q", code, body)
	}
	for _, want := range []string{"GET /hello?x=1 HTTP/1.1", "Host: 8080-sb-web.wrenn.test", "Authorization: Bearer the-apps-own", "X-Forwarded-For: 203.0.113.9"} {
		if !strings.Contains(body, want) {
			t.Errorf("the server in the sandbox did not see %q:\n%s", want, body)
		}
	}
	if strings.Contains(body, testToken) || strings.Contains(strings.ToLower(body), "wrenn-proxy") {
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
	if code, _ := get(call{port: "49983", token: testToken}, "/envs", false); code != http.StatusUnauthorized {
		t.Fatalf("envd without its token answered %d", code)
	}
	code, body = get(call{port: "49983", token: testToken, header: http.Header{"X-Access-Token": {envdToken}}}, "/envs", false)
	if code != 200 || !strings.Contains(body, `"WRENN_SANDBOX_ID":"sb-web"`) || !strings.Contains(body, `"E2B_SANDBOX_ID":"sb-web"`) {
		t.Fatalf("envd through the proxy: %d %s", code, body)
	}
	if out, _ := a.sh(ctx, sb.GetId(), `echo "$WRENN_SANDBOX_ID $WRENN_TEMPLATE_ID"; cat /run/wrenn/.WRENN_SANDBOX_ID`); out != "sb-web minimal\nsb-web\n" {
		t.Fatalf("the guest does not know who it is: %q", out)
	}

	// An Upgrade is tunnelled both ways.
	conn, err := net.Dial("tcp", a.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	_, _ = io.WriteString(conn, "GET /socket HTTP/1.1\r\nHost: 8081-sb-web.wrenn.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"+
		proxy.SandboxHeader+": sb-web\r\n"+proxy.PortHeader+": 8081\r\n"+proxy.TokenHeader+": Bearer "+testToken+"\r\n\r\n")
	r := bufio.NewReader(conn)
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

	for port, want := range map[string]int{"0": http.StatusBadRequest, "x": http.StatusBadRequest, "9999": http.StatusBadGateway} {
		if code, body := get(call{port: port, token: testToken}, "/", false); code != want || !strings.Contains(body, `"message"`) {
			t.Errorf("port %s: %d %s", port, code, body)
		}
	}
	missing, _ := http.NewRequest(http.MethodGet, "http://"+a.addr+"/", nil)
	missing.Header.Set(proxy.SandboxHeader, "sb-missing")
	missing.Header.Set(proxy.PortHeader, "8080")
	missing.Header.Set(proxy.TokenHeader, "Bearer "+testToken)
	if res, err := http.DefaultClient.Do(missing); err != nil || res.StatusCode != http.StatusNotFound {
		t.Errorf("unknown sandbox: %v %v", res, err)
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(call{port: "8080", token: testToken}, "/", false); code != http.StatusConflict {
		t.Fatalf("proxy to a paused sandbox: %d", code)
	}
}
