package notify

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestPublicAddr(t *testing.T) {
	for addr, want := range map[string]bool{
		"8.8.8.8": true, "2606:4700::1111": true,
		"127.0.0.1": false, "10.1.2.3": false, "172.16.0.1": false, "192.168.1.1": false, "169.254.169.254": false,
		"100.64.0.1": false, "0.0.0.0": false, "::1": false, "fe80::1": false, "fd00::1": false, "::ffff:127.0.0.1": false,
		"224.0.0.1": false, "64:ff9b::a00:1": false,
	} {
		if got := PublicAddr(netip.MustParseAddr(addr)); got != want {
			t.Errorf("%s: public=%v, want %v", addr, got, want)
		}
	}
}

// The default client will not deliver to the control plane's own network.
func TestClientRefusesPrivateAddresses(t *testing.T) {
	hit := false
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hit = true }))
	defer srv.Close()
	err := Send(context.Background(), NewClient(false), "webhook", map[string]string{"url": srv.URL}, Message{})
	if err == nil || !strings.Contains(err.Error(), "non-public") || hit {
		t.Fatalf("delivery to loopback: %v (reached: %v)", err, hit)
	}
	if err := Send(context.Background(), NewClient(true), "webhook", map[string]string{"url": srv.URL}, Message{}); err != nil || !hit {
		t.Fatalf("allowed delivery: %v", err)
	}
}

func TestSignAndVerify(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	body := []byte(`{"event":"capsule.running"}`)
	ts, sig := Sign("s3cret", now, body)
	// Upstream's form: an RFC 3339 time and sha256=<hex HMAC of "<ts>.<body>">.
	mac := hmac.New(sha256.New, []byte("s3cret"))
	mac.Write([]byte("2027-01-15T08:00:00Z." + string(body)))
	if ts != "2027-01-15T08:00:00Z" || sig != "sha256="+hex.EncodeToString(mac.Sum(nil)) {
		t.Fatalf("signed %q %q", ts, sig)
	}
	if err := Verify("s3cret", sig, ts, body, 5*time.Minute, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		secret, sig, ts string
		body            []byte
		at              time.Time
	}{
		"other secret":      {"other", sig, ts, body, now},
		"changed body":      {"s3cret", sig, ts, []byte(`{"event":"capsule.paused"}`), now},
		"too old":           {"s3cret", sig, ts, body, now.Add(time.Hour)},
		"other timestamp":   {"s3cret", sig, "2027-01-15T08:00:01Z", body, now},
		"garbled signature": {"s3cret", "v1=abc", ts, body, now},
		"garbled timestamp": {"s3cret", sig, "1800000000", body, now},
	} {
		if err := Verify(c.secret, c.sig, c.ts, c.body, 5*time.Minute, c.at); err == nil {
			t.Errorf("%s: verified", name)
		}
	}
}

func TestValidateConfig(t *testing.T) {
	good := map[string]map[string]string{
		"webhook":  {"url": "https://example.com/hook", "secret": "x"},
		"slack":    {"webhook_url": "https://hooks.example.com/x"},
		"telegram": {"bot_token": "1:abc", "chat_id": "42"},
		"matrix":   {"homeserver_url": "https://m.example.com", "access_token": "t", "room_id": "!r:example.com"},
	}
	for p, cfg := range good {
		if err := ValidateConfig(p, cfg); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	for name, c := range map[string]struct {
		provider string
		cfg      map[string]string
	}{
		"unknown provider": {"pager", map[string]string{}},
		"missing url":      {"webhook", map[string]string{}},
		"ftp url":          {"webhook", map[string]string{"url": "ftp://example.com"}},
		"unknown key":      {"slack", map[string]string{"webhook_url": "https://x.example", "channel": "#a"}},
		"huge value":       {"discord", map[string]string{"webhook_url": "https://x.example/" + strings.Repeat("a", 3000)}},
	} {
		if err := ValidateConfig(c.provider, c.cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
