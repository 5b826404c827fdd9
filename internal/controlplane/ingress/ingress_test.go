package ingress

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestTargetOf(t *testing.T) {
	for _, c := range []struct {
		host    string
		headers map[string]string
		want    Target
		ok, bad bool
	}{
		{host: "8080-sb-abc123.wrenn.example:8000", want: Target{"sb-abc123", 8080, true}, ok: true},
		{host: "3000-SB-UPPER.localhost", want: Target{"sb-upper", 3000, true}, ok: true},
		{host: "49983-sb-x.e2b.example", headers: map[string]string{SandboxIDHeader: "sb-other", SandboxPortHeader: "1"}, want: Target{"sb-x", 49983, true}, ok: true},
		{host: "localhost:8000", headers: map[string]string{SandboxIDHeader: "sb-abc", SandboxPortHeader: "49983"}, want: Target{"sb-abc", 49983, false}, ok: true},
		{host: "localhost:8000"},
		{host: "api-1.example.com"},
		{host: "8080-notasandbox.example.com"},
		{host: "99999-sb-abc.example.com", ok: true, bad: true},
		{host: "0-sb-abc.example.com", ok: true, bad: true},
		{host: "localhost", headers: map[string]string{SandboxIDHeader: "sb-abc"}, ok: true, bad: true},
		{host: "localhost", headers: map[string]string{SandboxIDHeader: "../etc", SandboxPortHeader: "80"}, ok: true, bad: true},
		{host: "localhost", headers: map[string]string{SandboxIDHeader: "sb-abc", SandboxPortHeader: "x"}, ok: true, bad: true},
	} {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Host = c.host
		for k, v := range c.headers {
			r.Header.Set(k, v)
		}
		got, ok, err := TargetOf(r)
		if ok != c.ok || (err != nil) != c.bad || (err != nil && !errors.Is(err, ErrBadTarget)) || (!c.bad && got != c.want) {
			t.Errorf("%s %v: %+v %v %v", c.host, c.headers, got, ok, err)
		}
	}
}

func TestStripCredentials(t *testing.T) {
	h := http.Header{}
	h.Set("X-API-Key", "wrn_x")
	h.Set(TrafficTokenHeader, "t")
	h.Set("Authorization", "Bearer app")
	h.Add("Cookie", "a=1; "+TrafficCookie+"=secret; b=2")
	h.Set("X-Access-Token", "envd")
	StripCredentials(h, false)
	if h.Get("X-API-Key") != "" || h.Get(TrafficTokenHeader) != "" || h.Get("Cookie") != "a=1; b=2" || h.Get("Authorization") != "Bearer app" || h.Get("X-Access-Token") != "envd" {
		t.Fatalf("after stripping: %v", h)
	}
	StripCredentials(h, true)
	if h.Get("Authorization") != "" {
		t.Fatal("the control plane's own Authorization was forwarded")
	}
	h = http.Header{"Cookie": {TrafficCookie + "=only"}}
	StripCredentials(h, false)
	if _, ok := h["Cookie"]; ok {
		t.Fatalf("an empty Cookie header was left: %v", h)
	}
}

func TestURL(t *testing.T) {
	if got := URL("http", "localhost:8000", "sb-a", 8080); got != "http://8080-sb-a.localhost:8000" {
		t.Fatal(got)
	}
}
