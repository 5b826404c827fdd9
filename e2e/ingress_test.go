package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/wrenn/wrenn/internal/testutil/freeport"
	"github.com/wrenn/wrenn/internal/testutil/gobin"
	"github.com/wrenn/wrenn/internal/testutil/testcerts"
	"github.com/wrenn/wrenn/pkg/wrenn"
)

// echoed is what guestweb's /echo saw of a request.
type echoed struct {
	Host    string      `json:"host"`
	URI     string      `json:"uri"`
	Proto   string      `json:"proto"`
	Headers http.Header `json:"headers"`
	Listen  string      `json:"listen"`
}

// ingressClient calls sandbox ports on the control plane's address,
// naming them by Host as DNS would.
type ingressClient struct {
	t    *testing.T
	addr string // the control plane's host:port
	hc   *http.Client
}

func (ic ingressClient) do(method, host, path string, header http.Header, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequest(method, "http://"+ic.addr+path, body)
	if err != nil {
		return nil, err
	}
	req.Host = host
	for k, v := range header {
		req.Header[k] = v
	}
	return ic.hc.Do(req)
}

// get answers status and body; it retries a 502 while a server starts.
func (ic ingressClient) get(host, path string, header http.Header) (int, string) {
	ic.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		res, err := ic.do(http.MethodGet, host, path, header, nil)
		if err != nil {
			ic.t.Fatalf("GET %s%s: %v", host, path, err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusBadGateway || time.Now().After(deadline) {
			return res.StatusCode, string(body)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func (ic ingressClient) echo(host string, header http.Header) echoed {
	ic.t.Helper()
	code, body := ic.get(host, "/echo?q=1", header)
	if code != http.StatusOK {
		ic.t.Fatalf("GET %s/echo: %d %s", host, code, body)
	}
	var e echoed
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		ic.t.Fatalf("echo %q: %v", body, err)
	}
	return e
}

// A user's web app in a capsule is reached through the control plane:
// by Host (<port>-<id>.<domain>) and by E2B's headers, over HTTP/1.1 and
// h2c, streaming, with large bodies both ways and WebSockets; a server
// bound to the guest's loopback is reached too. Ports of a capsule that
// is not public need the team's key or JWT or the capsule's traffic
// token, and the ingress's credentials never reach the app; another
// team's credentials reach nothing; envd's port passes to envd, which
// wants its token; paused capsules answer 409 or, with auto-resume,
// wake up; destroyed and unknown ones answer 404.
func TestIngress(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	addr := strings.TrimPrefix(s.url, "http://")
	ic := ingressClient{t: t, addr: addr, hc: &http.Client{Timeout: time.Minute, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}

	private, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, AutoResume: true, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	public, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Public: true, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range []wrenn.Capsule{private, public} {
		startGuestWeb(ctx, t, c, sb.ID, "0.0.0.0:8080")
	}
	startGuestWeb(ctx, t, c, private.ID, "127.0.0.1:8082")
	host := func(port int, id string) string {
		return fmt.Sprintf("%d-%s.localhost:%s", port, id, strings.Split(addr, ":")[1])
	}
	key := http.Header{"X-Api-Key": {s.key}}

	// The team's key opens a private port; the app sees the public name,
	// the client's address and its own headers, not the key.
	e := ic.echo(host(8080, private.ID), http.Header{"X-Api-Key": {s.key}, "Authorization": {"Bearer the-apps-own-token"}, "Cookie": {"app=1"}})
	if e.Host != host(8080, private.ID) || e.URI != "/echo?q=1" || e.Headers.Get("X-Forwarded-For") != "127.0.0.1" ||
		e.Headers.Get("Authorization") != "Bearer the-apps-own-token" || e.Headers.Get("Cookie") != "app=1" {
		t.Fatalf("the app saw %+v", e)
	}
	for k := range e.Headers {
		if strings.EqualFold(k, "X-Api-Key") || strings.HasPrefix(strings.ToLower(k), "wrenn-") {
			t.Fatalf("the ingress's or the agent's header %s reached the app: %v", k, e.Headers)
		}
	}
	// A team member's JWT opens it too, and is not forwarded.
	if e := ic.echo(host(8080, private.ID), http.Header{"Authorization": {"Bearer " + s.token}}); e.Headers.Get("Authorization") != "" {
		t.Fatalf("the user's JWT reached the app: %v", e.Headers)
	}
	// So does the capsule's traffic token; and a link carrying it becomes
	// a cookie for a browser.
	full, err := c.GetCapsule(ctx, private.ID)
	if err != nil || full.TrafficAccessToken == "" || full.EnvdAccessToken == "" {
		t.Fatalf("the capsule's tokens: %+v %v", full, err)
	}
	if e := ic.echo(host(8080, private.ID), http.Header{"E2b-Traffic-Access-Token": {full.TrafficAccessToken}}); e.Headers.Get("E2b-Traffic-Access-Token") != "" {
		t.Fatalf("the traffic token reached the app: %v", e.Headers)
	}
	res, err := ic.do(http.MethodGet, host(8080, private.ID), "/echo?x=2&wrenn_traffic_token="+url.QueryEscape(full.TrafficAccessToken), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	cookies := res.Cookies()
	if res.StatusCode != http.StatusFound || res.Header.Get("Location") != "/echo?x=2" || len(cookies) != 1 || !cookies[0].HttpOnly {
		t.Fatalf("a link with the traffic token: %d %v %v", res.StatusCode, res.Header, cookies)
	}
	e = ic.echo(host(8080, private.ID), http.Header{"Cookie": {cookies[0].Name + "=" + cookies[0].Value + "; theme=dark"}})
	if e.Headers.Get("Cookie") != "theme=dark" {
		t.Fatalf("cookies the app saw: %q", e.Headers.Get("Cookie"))
	}

	// Without credentials, or with wrong ones, a private port is closed.
	for name, h := range map[string]http.Header{
		"nothing":          nil,
		"a wrong key":      {"X-Api-Key": {"wrn_" + strings.Repeat("x", 32)}},
		"a wrong token":    {"E2b-Traffic-Access-Token": {"not-it"}},
		"the app's bearer": {"Authorization": {"Bearer a.b.c"}},
	} {
		if code, body := ic.get(host(8080, private.ID), "/echo", h); code != http.StatusUnauthorized || !strings.Contains(body, `"message"`) {
			t.Errorf("%s: %d %s", name, code, body)
		}
	}
	// A public capsule answers anyone.
	if e := ic.echo(host(8080, public.ID), nil); e.Listen != "0.0.0.0:8080" {
		t.Fatalf("public capsule: %+v", e)
	}
	// Another team's key reaches neither, not even the public one.
	other := otherTeamKey(ctx, t, s)
	for _, id := range []string{private.ID, public.ID} {
		if code, body := ic.get(host(8080, id), "/echo", http.Header{"X-Api-Key": {other}}); code != http.StatusNotFound {
			t.Errorf("another team's key on %s: %d %s", id, code, body)
		}
		if code, _ := ic.get(host(49983, id), "/health", http.Header{"X-Api-Key": {other}}); code != http.StatusNotFound {
			t.Errorf("another team's key on envd of %s: %d", id, code)
		}
	}

	// By E2B's headers on the control plane's own URL, as E2B_SANDBOX_URL makes the SDKs do.
	e = ic.echo(addr, http.Header{"E2b-Sandbox-Id": {private.ID}, "E2b-Sandbox-Port": {"8080"}, "X-Api-Key": {s.key}})
	if e.Listen != "0.0.0.0:8080" || e.Headers.Get("E2b-Sandbox-Id") != "" {
		t.Fatalf("routed by headers: %+v", e)
	}
	// A server bound to the guest's 127.0.0.1 is reachable.
	if e := ic.echo(host(8082, private.ID), key); e.Listen != "127.0.0.1:8082" {
		t.Fatalf("loopback server: %+v", e)
	}
	// envd's port reaches envd, which wants its own token.
	if code, _ := ic.get(host(49983, private.ID), "/envs", nil); code != http.StatusUnauthorized {
		t.Fatalf("envd without its token: %d", code)
	}
	code, body := ic.get(host(49983, private.ID), "/envs", http.Header{"X-Access-Token": {full.EnvdAccessToken}})
	if code != http.StatusOK || !strings.Contains(body, `"WRENN_SANDBOX_ID":"`+private.ID+`"`) {
		t.Fatalf("envd through the ingress: %d %s", code, body)
	}

	// h2c end to end from the client's side.
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	h2c := ingressClient{t: t, addr: addr, hc: &http.Client{Timeout: time.Minute, Transport: &http.Transport{Protocols: &protocols}}}
	res, err = h2c.do(http.MethodGet, host(8080, public.ID), "/echo", nil, nil)
	if err != nil || res.ProtoMajor != 2 || res.StatusCode != http.StatusOK {
		t.Fatalf("h2c through the ingress: %v %v", res, err)
	}
	res.Body.Close()

	// Streaming: the first event arrives long before the stream ends.
	start := time.Now()
	res, err = ic.do(http.MethodGet, host(8080, private.ID), "/stream?n=4", key, nil)
	if err != nil {
		t.Fatal(err)
	}
	first, err := bufio.NewReader(res.Body).ReadString('\n')
	if err != nil || first != "data: 1\n" || time.Since(start) > 2500*time.Millisecond {
		t.Fatalf("first event %q after %v: %v", first, time.Since(start), err)
	}
	res.Body.Close()

	// 64 MiB down and up, intact.
	const big = 64 << 20
	res, err = ic.do(http.MethodGet, host(8080, private.ID), fmt.Sprintf("/download?n=%d", big), key, nil)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, err := io.Copy(h, res.Body)
	res.Body.Close()
	if err != nil || n != big || hex.EncodeToString(h.Sum(nil)) != patternSHA(big) {
		t.Fatalf("download: %d bytes, %v", n, err)
	}
	res, err = ic.do(http.MethodPost, host(8080, private.ID), "/upload", key, io.LimitReader(&pattern{}, big))
	if err != nil {
		t.Fatal(err)
	}
	var up struct {
		Bytes  int64  `json:"bytes"`
		SHA256 string `json:"sha256"`
	}
	err = json.NewDecoder(res.Body).Decode(&up)
	res.Body.Close()
	if err != nil || up.Bytes != big || up.SHA256 != patternSHA(big) {
		t.Fatalf("upload: %+v %v", up, err)
	}

	// A WebSocket, both ways.
	ws, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws", &websocket.DialOptions{Host: host(8080, private.ID), HTTPHeader: key})
	if err != nil {
		t.Fatalf("websocket through the ingress: %v", err)
	}
	ws.SetReadLimit(1 << 20)
	for _, msg := range []string{"hello", strings.Repeat("x", 100<<10)} {
		if err := ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		_, got, err := ws.Read(ctx)
		if err != nil || string(got) != "echo: "+msg {
			t.Fatalf("websocket echo: %d bytes, %v", len(got), err)
		}
	}
	ws.Close(websocket.StatusNormalClosure, "")

	// The ports in use, with their URLs.
	ports, err := c.ListPorts(ctx, private.ID)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]wrenn.Port{}
	for _, p := range ports {
		seen[p.Port] = p
	}
	if p := seen[8082]; !p.Forwarded || p.Command != "guestweb" || p.URL != "http://"+host(8082, private.ID) {
		t.Fatalf("port 8082 listed as %+v (all: %+v)", p, ports)
	}
	if p := seen[8080]; p.Forwarded || p.URL != full.URL(8080) {
		t.Fatalf("port 8080 listed as %+v", p)
	}
	if _, ok := seen[49983]; ok {
		t.Fatalf("envd's own port is listed: %+v", ports)
	}

	// Bad addresses.
	for h, want := range map[string]int{
		host(99999, private.ID):   http.StatusBadRequest,
		host(8080, "sb-nosuchid"): http.StatusNotFound,
	} {
		if code, body := ic.get(h, "/", key); code != want {
			t.Errorf("%s: %d %s", h, code, body)
		}
	}

	// Paused: 409 without auto-resume; with it, traffic wakes the capsule.
	if _, err := c.PauseCapsule(ctx, public.ID); err != nil {
		t.Fatal(err)
	}
	if code, body := ic.get(host(8080, public.ID), "/echo", nil); code != http.StatusConflict || !strings.Contains(body, "paused") {
		t.Fatalf("a paused capsule without auto-resume: %d %s", code, body)
	}
	if _, err := c.PauseCapsule(ctx, private.ID); err != nil {
		t.Fatal(err)
	}
	if code, _ := ic.get(host(8080, private.ID), "/echo", nil); code != http.StatusUnauthorized {
		t.Fatalf("a stranger woke a paused capsule: %d", code)
	}
	if cur, _ := c.GetCapsule(ctx, private.ID); cur.Status != "paused" {
		t.Fatalf("after a refused request the capsule is %s", cur.Status)
	}
	if e := ic.echo(host(8080, private.ID), key); e.Listen != "0.0.0.0:8080" {
		t.Fatalf("after auto-resume: %+v", e)
	}
	if cur, _ := c.GetCapsule(ctx, private.ID); cur.Status != "running" {
		t.Fatalf("after traffic the auto-resume capsule is %s", cur.Status)
	}

	// Destroyed: 404.
	if _, err := c.DestroyCapsule(ctx, private.ID); err != nil {
		t.Fatal(err)
	}
	if code, _ := ic.get(host(8080, private.ID), "/echo", key); code != http.StatusNotFound {
		t.Fatalf("a destroyed capsule: %d", code)
	}
	if _, err := c.DestroyCapsule(ctx, public.ID); err != nil {
		t.Fatal(err)
	}
	s.nothingLeft()
}

// startGuestWeb copies guestweb into the capsule (once) and starts it on addr.
func startGuestWeb(ctx context.Context, t *testing.T, c *wrenn.Client, id, addr string) {
	t.Helper()
	if res, err := c.Exec(ctx, id, wrenn.ExecParams{Cmd: "test", Args: []string{"-x", "/tmp/guestweb"}}); err != nil {
		t.Fatal(err)
	} else if res.ExitCode != 0 {
		prog, err := os.Open(gobin.Static(t, "internal/testutil/guestweb"))
		if err != nil {
			t.Fatal(err)
		}
		defer prog.Close()
		if err := c.WriteFile(ctx, id, "/tmp/guestweb", prog); err != nil {
			t.Fatal(err)
		}
		if res, err := c.Exec(ctx, id, wrenn.ExecParams{Cmd: "chmod", Args: []string{"+x", "/tmp/guestweb"}}); err != nil || res.ExitCode != 0 {
			t.Fatalf("chmod: %+v %v", res, err)
		}
	}
	if _, err := c.StartProcess(ctx, id, wrenn.ExecParams{Cmd: "/tmp/guestweb", Args: []string{addr}}, ""); err != nil {
		t.Fatal(err)
	}
}

// otherTeamKey signs up a second user (their own team) and returns an API key of theirs.
func otherTeamKey(ctx context.Context, t *testing.T, s *stack) string {
	t.Helper()
	anon, _ := wrenn.New(s.url)
	if err := anon.Signup(ctx, "other@example.com", "another long password", "Other"); err != nil {
		t.Fatal(err)
	}
	login, err := anon.Login(ctx, "other@example.com", "another long password")
	if err != nil {
		t.Fatal(err)
	}
	user, _ := wrenn.New(s.url, wrenn.WithToken(login.Token))
	k, err := user.CreateAPIKey(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	return k.Key
}

// pattern is guestweb's body: byte i is i % 251.
type pattern struct{ off int64 }

func (p *pattern) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = byte((p.off + int64(i)) % 251)
	}
	p.off += int64(len(b))
	return len(b), nil
}

func patternSHA(n int64) string {
	h := sha256.New()
	_, _ = io.CopyN(h, &pattern{}, n)
	return hex.EncodeToString(h.Sum(nil))
}

// The ingress on a listener of its own, with TLS for a wildcard name: a
// capsule's URLs are https ones under the configured domain, HTTP/2
// comes by ALPN, and that listener serves sandbox ports only. The CLI
// prints the same URLs.
func TestIngressOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.Issue(t, dir, "ca", testcerts.CA, nil)
	cert := testcerts.Issue(t, dir, "*.sandboxes.test", testcerts.Server, ca)
	port := freeport.Get(t)
	s := startStack(t, "WRENN_INGRESS_LISTEN_ADDR=127.0.0.1:"+port, "WRENN_INGRESS_DOMAIN=sandboxes.test:"+port,
		"WRENN_INGRESS_TLS_CERT="+cert.CertFile, "WRENN_INGRESS_TLS_KEY="+cert.KeyFile)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Public: true, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	startGuestWeb(ctx, t, c, sb.ID, "0.0.0.0:3000")
	want := fmt.Sprintf("https://3000-%s.sandboxes.test:%s", sb.ID, port)
	if got := sb.URL(3000); got != want {
		t.Fatalf("the capsule's URL is %s, want %s", got, want)
	}
	cl := &cli{t: t, bin: filepath.Join(s.bin, "wrenn"), config: filepath.Join(t.TempDir(), "config.json"), env: []string{"WRENN_URL=" + s.url, "WRENN_API_KEY=" + s.key}}
	if out := strings.TrimSpace(cl.ok("sandbox", "url", sb.ID, "3000")); out != want {
		t.Fatalf("wrenn sandbox url: %q, want %q", out, want)
	}

	roots := x509.NewCertPool()
	roots.AddCert(ca.X509)
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, "127.0.0.1:"+port) // as wildcard DNS would
	}
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DialContext: dial, ForceAttemptHTTP2: true, TLSClientConfig: &tls.Config{RootCAs: roots}}}
	var res *http.Response
	deadline := time.Now().Add(20 * time.Second)
	for {
		res, err = hc.Get(want + "/echo")
		if err == nil && res.StatusCode == http.StatusOK || time.Now().After(deadline) {
			break
		}
		if err == nil {
			res.Body.Close()
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	var e echoed
	_ = json.NewDecoder(res.Body).Decode(&e)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || res.ProtoMajor != 2 || e.Headers.Get("X-Forwarded-Proto") != "https" || e.Host != strings.TrimPrefix(want, "https://") {
		t.Fatalf("over TLS: %d %s, the app saw %+v", res.StatusCode, res.Proto, e)
	}
	// api.<domain> there is the API (where E2B's SDKs look given only
	// E2B_DOMAIN); any other name is refused.
	req, _ := http.NewRequest(http.MethodGet, "https://api.sandboxes.test:"+port+"/v1/capsules", nil)
	req.Header.Set("X-API-Key", s.key)
	res, err = hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !strings.Contains(string(body), sb.ID) {
		t.Fatalf("the API at api.<domain>: %d %s", res.StatusCode, body)
	}
	res, err = hc.Get("https://www.sandboxes.test:" + port + "/v1/capsules")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "sandbox ingress") {
		t.Fatalf("another name on the ingress listener: %d %s", res.StatusCode, body)
	}
	if out := cl.ok("sandbox", "ports", sb.ID); !strings.Contains(out, "3000") || !strings.Contains(out, want) || !strings.Contains(out, "guestweb") {
		t.Fatalf("wrenn sandbox ports:\n%s", out)
	}
	if _, err := c.DestroyCapsule(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
}
