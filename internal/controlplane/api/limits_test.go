package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/testutil/pgtest"
)

// limitedCP serves the API through the server wrenn-cp runs (HTTPServer),
// with its connection limits shortened for the test.
func limitedCP(t *testing.T) *cp {
	t.Helper()
	c := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.Limits = Limits{ReadHeader: time.Second, Idle: 2 * time.Second, Body: 2 * time.Second}
		cfg.PublicPerMinute, cfg.PublicBurst = 6, 10 // slow enough that a slow machine refills little
		cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := c.srv.HTTPServer()
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close() })
	c.url = "http://" + ln.Addr().String()
	return c
}

// closedWithin opens n connections, writes what each sends, and reports
// how many the server closed within d (reading all it answers).
func closedWithin(t *testing.T, addr string, n int, send string, d time.Duration) int {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	closed := 0
	for range n {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := io.WriteString(conn, send); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = conn.SetReadDeadline(time.Now().Add(d))
			_, err := io.Copy(io.Discard, conn) // nil at end of file: the server closed it
			if err == nil {
				mu.Lock()
				closed++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return closed
}

// Slow bodies, slow headers and idle keep-alives are cut off; guessing
// passwords meets 429 with Retry-After from one address, and an account
// under attack from many addresses waits longer after each failure.
func TestConnectionsAndLoginsAreLimited(t *testing.T) {
	c := limitedCP(t)
	addr := c.url[len("http://"):]
	c.signup("victim@example.com")

	slowBody := "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"email\":"
	if n := closedWithin(t, addr, 50, slowBody, 6*time.Second); n != 50 {
		t.Errorf("slow bodies: %d of 50 connections closed within 6 s (body deadline 2 s)", n)
	}
	slowHeaders := "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\n"
	if n := closedWithin(t, addr, 50, slowHeaders, 5*time.Second); n != 50 {
		t.Errorf("slow headers: %d of 50 connections closed within 5 s (header deadline 1 s)", n)
	}
	idle := "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
	if n := closedWithin(t, addr, 50, idle, 6*time.Second); n != 50 {
		t.Errorf("idle keep-alives: %d of 50 connections closed within 6 s (idle timeout 2 s)", n)
	}

	login := func(password, from string) *http.Response {
		body, _ := json.Marshal(map[string]string{"email": "victim@example.com", "password": password})
		req, _ := http.NewRequest("POST", c.url+"/v1/auth/login", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if from != "" {
			req.Header.Set("X-Forwarded-For", from)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	// 150 wrong passwords in a burst from one address (the proxy says which).
	statuses := map[int]int{}
	for range 150 {
		resp := login("wrong password!", "203.0.113.5")
		statuses[resp.StatusCode]++
		if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
			t.Fatal("429 without Retry-After")
		}
	}
	if statuses[http.StatusTooManyRequests] < 130 || statuses[http.StatusOK] > 0 {
		t.Fatalf("150 wrong passwords from one address: %v", statuses)
	}
	// The account itself now waits, whichever address asks, with the right
	// password too. On a slow machine the burst can outlast the account's
	// first short wait, so make sure a wait has just begun: one more guess
	// either fails (and starts a longer wait) or meets the current one.
	for i := range 4 {
		r := login("wrong password!", fmt.Sprintf("198.51.100.%d", 70+i))
		if r.StatusCode == http.StatusUnauthorized {
			break
		}
		if r.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("a guess after the burst: %d", r.StatusCode)
		}
		secs, _ := strconv.Atoi(r.Header.Get("Retry-After"))
		time.Sleep(time.Duration(secs)*time.Second + 100*time.Millisecond)
	}
	resp := login("correct horse", "198.51.100.77")
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("the right password during the account's wait: %d", resp.StatusCode)
	}
	wait, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
	if wait < 1 {
		t.Fatalf("Retry-After %q", resp.Header.Get("Retry-After"))
	}
	t.Logf("after the burst the account waits %d s", wait)
	// Each further failure doubles the wait: spread over many addresses,
	// guesses come slower and slower.
	var waits []int
	for i := range 2 {
		time.Sleep(time.Duration(waits0(waits, wait))*time.Second + 100*time.Millisecond)
		if r := login("another guess!!", fmt.Sprintf("198.51.100.%d", 10+i)); r.StatusCode != http.StatusUnauthorized {
			t.Fatalf("a guess after the wait: %d", r.StatusCode)
		}
		r := login("another guess!!", fmt.Sprintf("198.51.100.%d", 20+i))
		w, _ := strconv.Atoi(r.Header.Get("Retry-After"))
		if r.StatusCode != http.StatusTooManyRequests || len(waits) > 0 && w <= waits[len(waits)-1] {
			t.Fatalf("the wait after failure %d: %d, Retry-After %d (before: %v)", i, r.StatusCode, w, waits)
		}
		waits = append(waits, w)
	}
	t.Logf("waits after further failures: %v s", waits)
	// The owner gets in once the wait is over, and that clears the count.
	time.Sleep(time.Duration(waits[len(waits)-1])*time.Second + 100*time.Millisecond)
	if r := login("correct horse", "198.51.100.99"); r.StatusCode != http.StatusOK {
		t.Fatalf("the right password after the wait: %d", r.StatusCode)
	}
	if r := login("wrong password!", "198.51.100.98"); r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("one failure after a success: %d", r.StatusCode)
	}

	// Parallel guesses cannot all pass before the first is counted: each
	// claims its try in one update of the account's row.
	var wg sync.WaitGroup
	var mu sync.Mutex
	parallel := map[int]int{}
	for i := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code := login("parallel guess!", fmt.Sprintf("192.0.2.%d", i+1)).StatusCode
			mu.Lock()
			parallel[code]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if parallel[http.StatusUnauthorized] > loginFailuresFree+1 {
		t.Fatalf("30 parallel guesses from 30 addresses: %v (at most %d may be checked)", parallel, loginFailuresFree+1)
	}
	// An email without an account waits the same way: the 429 tells nothing.
	ghost := map[int]int{}
	ghostStart := time.Now()
	for i := range 8 {
		body, _ := json.Marshal(map[string]string{"email": "ghost@example.com", "password": "a guess!"})
		req, _ := http.NewRequest("POST", c.url+"/v1/auth/login", bytes.NewReader(body))
		req.Header.Set("X-Forwarded-For", fmt.Sprintf("192.0.2.%d", 100+i))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		ghost[resp.StatusCode]++
	}
	// On a loaded machine the first wait (1 s) may pass within the eight
	// tries, and one more guess is then rightly checked.
	extra := 0
	if time.Since(ghostStart) > time.Second {
		extra = 1
	}
	if got := ghost[http.StatusUnauthorized]; got < loginFailuresFree || got > loginFailuresFree+extra || ghost[http.StatusTooManyRequests] != 8-got {
		t.Fatalf("an email without an account: %v in %v", ghost, time.Since(ghostStart))
	}

	// X-Forwarded-For counts only from a trusted proxy: through an
	// untrusted peer the header is the client's own words.
	untrusted := newCPOn(t, pgtest.URL(t), []byte("test-secret-0123456789abcdef0123456789"), func(cfg *Config) {
		cfg.PublicPerMinute, cfg.PublicBurst = 1, 5
	})
	limited := 0
	for i := range 20 {
		body := bytes.NewBufferString(`{"refresh_token":"wrr_not-a-token"}`)
		req, _ := http.NewRequest("POST", untrusted.url+"/v1/hosts/auth/refresh", body)
		req.Header.Set("X-Forwarded-For", fmt.Sprintf("198.51.100.%d", i))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusTooManyRequests {
			limited++
		}
	}
	if limited < 14 {
		t.Fatalf("forged X-Forwarded-For escaped the limit: %d of 20 limited", limited)
	}
}

func waits0(waits []int, first int) int {
	if len(waits) == 0 {
		return first
	}
	return waits[len(waits)-1]
}

// A body deadline bounds the body, not the call: a request that takes
// longer than it (with a body, or without) keeps its context.
func TestBodyDeadlineDoesNotCancelLongCalls(t *testing.T) {
	got := make(chan error, 2)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bodyDeadline(w, r, 200*time.Millisecond)
		_, _ = io.ReadAll(r.Body)
		time.Sleep(600 * time.Millisecond)
		got <- r.Context().Err()
		w.WriteHeader(http.StatusNoContent)
	}))
	defer hs.Close()
	for _, body := range []io.Reader{nil, strings.NewReader(`{"a":1}`)} {
		resp, err := http.Post(hs.URL, "application/json", body)
		if err != nil || resp.StatusCode != http.StatusNoContent {
			t.Fatalf("%v %v", resp, err)
		}
		resp.Body.Close()
		if err := <-got; err != nil {
			t.Fatalf("the call's context ended with its body deadline: %v", err)
		}
	}
	// A body that does not come in time is cut off.
	conn, err := net.Dial("tcp", hs.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = io.WriteString(conn, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
	_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.Copy(io.Discard, conn); err != nil {
		t.Fatalf("a slow body held the connection: %v", err)
	}
}

// IPv6 clients are one client per /64; X-Forwarded-For from a trusted
// proxy names the client, from anyone else nothing.
func TestClientKey(t *testing.T) {
	s := &Server{cfg: Config{TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}}
	key := func(remote, xff string) string {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = remote
		if xff != "" {
			r.Header.Set("X-Forwarded-For", xff)
		}
		return s.clientKey(r)
	}
	for _, c := range []struct{ remote, xff, want string }{
		{"203.0.113.7:5000", "", "203.0.113.7"},
		{"203.0.113.7:5000", "198.51.100.1", "203.0.113.7"},
		{"10.1.2.3:5000", "198.51.100.1", "198.51.100.1"},
		{"10.1.2.3:5000", "198.51.100.1, 10.9.9.9", "198.51.100.1"},
		{"10.1.2.3:5000", "garbage", "10.1.2.3"},
		{"[2001:db8:1:2:3:4:5:6]:5000", "", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff::1]:5000", "", "2001:db8:1:2::/64"},
	} {
		if got := key(c.remote, c.xff); got != c.want {
			t.Errorf("%s with %q: %s, want %s", c.remote, c.xff, got, c.want)
		}
	}
}
