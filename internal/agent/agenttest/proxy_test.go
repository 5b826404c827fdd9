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

	pb "github.com/wrenn/wrenn/proto/hostagent/v1"
)

// Two servers inside the sandbox, made with socat from the minimal image:
// plain HTTP on 8080, and on 8081 a server that accepts an Upgrade and
// then echoes, as a WebSocket server would after its handshake.
const guestServers = `cat > /tmp/http.sh <<'SCRIPT'
#!/bin/sh
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\n\r\nhello from port 8080\n'
SCRIPT
cat > /tmp/upgrade.sh <<'SCRIPT'
#!/bin/bash
while IFS= read -r line; do [ "$line" = $'\r' ] && break; done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'
exec cat
SCRIPT
chmod +x /tmp/http.sh /tmp/upgrade.sh`

func TestProxyHTTPAndUpgrade(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 2*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-web"})
	if out, code := a.sh(ctx, sb.GetId(), guestServers); code != 0 {
		t.Fatalf("setup: %q", out)
	}
	for port, script := range map[string]string{"8080": "/tmp/http.sh", "8081": "/tmp/upgrade.sh"} {
		if _, err := a.client.StartProcess(ctx, connect.NewRequest(&pb.ExecRequest{
			SandboxId: sb.GetId(), Cmd: "socat", Args: []string{"TCP-LISTEN:" + port + ",reuseaddr,fork", "EXEC:" + script},
		})); err != nil {
			t.Fatal(err)
		}
	}
	// get retries a 502 while the guest's servers may still be starting.
	get := func(host string, retry bool) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+a.proxy+"/", nil)
		req.Host = host
		deadline := time.Now()
		if retry {
			deadline = deadline.Add(10 * time.Second)
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
	if code, body := get("8080-sb-web.wrenn.test", true); code != 200 || body != "hello from port 8080\n" {
		t.Fatalf("HTTP through the proxy: %d %q", code, body)
	}

	// An Upgrade is tunnelled both ways.
	conn, err := net.Dial("tcp", a.proxy)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	_, _ = io.WriteString(conn, "GET /socket HTTP/1.1\r\nHost: 8081-sb-web.wrenn.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
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

	for host, want := range map[string]int{
		"example.com":             http.StatusBadRequest,
		"8080-sb-missing.wrenn.x": http.StatusNotFound,
		"49983-sb-web.wrenn.x":    http.StatusForbidden,
		"9999-sb-web.wrenn.x":     http.StatusBadGateway,
	} {
		if code, body := get(host, false); code != want || !strings.Contains(body, `"message"`) {
			t.Errorf("%s: %d %s", host, code, body)
		}
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	if code, _ := get("8080-sb-web.wrenn.x", false); code != http.StatusConflict {
		t.Fatalf("proxy to a paused sandbox: %d", code)
	}
}
