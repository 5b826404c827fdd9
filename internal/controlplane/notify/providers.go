// Package notify delivers lifecycle events to a team's channels: signed
// webhooks and chat services. Deliveries are at least once and in order
// per channel; a failing channel is retried with backoff.
package notify

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Providers lists the supported channel kinds and their required config.
var Providers = map[string][]string{
	"webhook":    {"url"},
	"slack":      {"webhook_url"},
	"discord":    {"webhook_url"},
	"teams":      {"webhook_url"},
	"googlechat": {"webhook_url"},
	"telegram":   {"bot_token", "chat_id"},
	"matrix":     {"homeserver_url", "access_token", "room_id"},
}

// optional config keys per provider (beyond the required ones).
var optional = map[string][]string{
	"webhook":  {"secret"},
	"telegram": {"api_url"}, // for self-hosted Bot API servers
}

// EventNames are the events a channel may subscribe to.
var EventNames = []string{
	"capsule.created", "capsule.running", "capsule.paused", "capsule.destroyed", "capsule.error",
	"template.snapshot.created", "template.snapshot.deleted", "host.up", "host.down",
}

// ValidateConfig checks a provider's config: every required key, no
// unknown key, URLs that are http(s).
func ValidateConfig(provider string, cfg map[string]string) error {
	required, ok := Providers[provider]
	if !ok {
		names := make([]string, 0, len(Providers))
		for p := range Providers {
			names = append(names, p)
		}
		sort.Strings(names)
		return fmt.Errorf("provider must be one of %s", strings.Join(names, ", "))
	}
	allowed := map[string]bool{}
	for _, k := range append(append([]string{}, required...), optional[provider]...) {
		allowed[k] = true
	}
	for k, v := range cfg {
		if !allowed[k] {
			return fmt.Errorf("config key %q is not used by %s", k, provider)
		}
		if len(v) > 2048 {
			return fmt.Errorf("config %s is longer than 2048 characters", k)
		}
		if strings.HasSuffix(k, "url") && v != "" {
			u, err := url.Parse(v)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return fmt.Errorf("config %s must be an http or https URL", k)
			}
		}
	}
	for _, k := range required {
		if strings.TrimSpace(cfg[k]) == "" {
			return fmt.Errorf("%s needs config %s", provider, k)
		}
	}
	return nil
}

// Message is what a channel is told.
type Message struct {
	ID         string          `json:"id"`
	Event      string          `json:"event"`
	TeamID     string          `json:"team_id"`
	ResourceID string          `json:"resource_id"`
	Timestamp  int64           `json:"timestamp"`
	Data       json.RawMessage `json:"data"`
}

// Text is the one-line form chat providers show.
func (m Message) Text() string {
	if m.ID == "" {
		return "Wrenn: test notification"
	}
	return fmt.Sprintf("Wrenn: %s %s", m.Event, m.ResourceID)
}

// Webhook deliveries are signed as upstream Wrenn signs them, so a
// receiver written for it verifies ours unchanged: TimestampHeader is the
// time of the delivery (RFC 3339, UTC) and SignatureHeader is
// "sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with the channel
// secret>".
const (
	SignatureHeader = "X-Wrenn-Signature"
	TimestampHeader = "X-Wrenn-Timestamp"
)

// Sign returns the timestamp and signature header values of body sent at t.
func Sign(secret string, t time.Time, body []byte) (timestamp, signature string) {
	timestamp = t.UTC().Format(time.RFC3339)
	return timestamp, "sha256=" + hex.EncodeToString(mac(secret, timestamp, body))
}

func mac(secret, timestamp string, body []byte) []byte {
	h := hmac.New(sha256.New, []byte(secret))
	h.Write([]byte(timestamp + "."))
	h.Write(body)
	return h.Sum(nil)
}

// Verify checks a delivery's signature and timestamp headers against its
// body, refusing timestamps further than tolerance from now (receivers can
// use it; the tests do).
func Verify(secret, signature, timestamp string, body []byte, tolerance time.Duration, now time.Time) error {
	at, err := time.Parse(time.RFC3339, timestamp)
	if err != nil {
		return errors.New("malformed timestamp header")
	}
	hexSig, ok := strings.CutPrefix(signature, "sha256=")
	got, err := hex.DecodeString(hexSig)
	if !ok || err != nil {
		return errors.New("malformed signature header")
	}
	if d := now.Sub(at); d > tolerance || d < -tolerance {
		return errors.New("signature timestamp outside tolerance")
	}
	if !hmac.Equal(got, mac(secret, timestamp, body)) {
		return errors.New("signature mismatch")
	}
	return nil
}

// Send delivers one message through a provider.
func Send(ctx context.Context, client *http.Client, provider string, cfg map[string]string, m Message) error {
	var (
		method = http.MethodPost
		target string
		body   []byte
		header = http.Header{"Content-Type": {"application/json"}, "User-Agent": {"wrenn-notify/1"}}
	)
	text := m.Text()
	switch provider {
	case "webhook":
		target = cfg["url"]
		body, _ = json.Marshal(m)
		event := m.Event
		if event == "" {
			event = "test"
		}
		header.Set("X-Wrenn-Event", event)
		header.Set("X-Wrenn-Delivery", m.ID)
		if cfg["secret"] != "" {
			ts, sig := Sign(cfg["secret"], time.Now(), body)
			header.Set(TimestampHeader, ts)
			header.Set(SignatureHeader, sig)
		}
	case "slack", "googlechat", "teams":
		target = cfg["webhook_url"]
		body, _ = json.Marshal(map[string]string{"text": text})
	case "discord":
		target = cfg["webhook_url"]
		body, _ = json.Marshal(map[string]string{"content": text})
	case "telegram":
		base := cfg["api_url"]
		if base == "" {
			base = "https://api.telegram.org"
		}
		target = strings.TrimRight(base, "/") + "/bot" + cfg["bot_token"] + "/sendMessage"
		body, _ = json.Marshal(map[string]string{"chat_id": cfg["chat_id"], "text": text})
	case "matrix":
		method = http.MethodPut
		txn := m.ID
		if txn == "" {
			txn = "test-" + strconv.FormatInt(time.Now().UnixNano(), 36)
		}
		target = strings.TrimRight(cfg["homeserver_url"], "/") + "/_matrix/client/v3/rooms/" + url.PathEscape(cfg["room_id"]) +
			"/send/m.room.message/" + url.PathEscape(txn)
		body, _ = json.Marshal(map[string]string{"msgtype": "m.text", "body": text})
		header.Set("Authorization", "Bearer "+cfg["access_token"])
	default:
		return fmt.Errorf("unknown provider %q", provider)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	req.Header = header
	resp, err := client.Do(req)
	if err != nil {
		// The URL can hold a secret (bot token); report the host only.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("deliver to %s: %w", req.URL.Host, err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("deliver to %s: answered %s", req.URL.Host, resp.Status)
	}
	return nil
}
