package hostaddr

import (
	"errors"
	"net/netip"
	"testing"
)

func TestCheck(t *testing.T) {
	p := Policy{Own: []netip.Addr{netip.MustParseAddr("198.51.100.9")}}
	cases := []struct {
		typ, address string
		ok           bool
	}{
		{"byoc", "198.51.100.7:50051", true},
		{"byoc", "https://198.51.100.7:50051", true},
		{"byoc", "[2001:db8::1]:50051", true},
		{"byoc", "127.0.0.1:55432", false},
		{"byoc", "[::1]:50051", false},
		{"byoc", "10.0.0.5:50051", false},
		{"byoc", "172.20.1.1:50051", false},
		{"byoc", "192.168.1.10:50051", false},
		{"byoc", "100.64.3.4:50051", false},
		{"byoc", "169.254.169.254:80", false},
		{"byoc", "[fd00:ec2::254]:80", false},
		{"byoc", "[::ffff:127.0.0.1]:50051", false},
		{"byoc", "0.0.0.0:50051", false},
		{"byoc", "198.51.100.9:50051", false}, // the control plane itself
		{"byoc", "agent.example.com:50051", false},
		{"regular", "10.0.0.5:50051", true},
		{"regular", "127.0.0.1:50051", true},
		{"regular", "agent.internal:50051", true},
		{"regular", "169.254.169.254:80", false},
		{"regular", "[fe80::1]:50051", false},
	}
	for _, c := range cases {
		err := p.Check(c.typ, c.address)
		if (err == nil) != c.ok || err != nil && !errors.Is(err, ErrNotAllowed) {
			t.Errorf("%s %s: %v", c.typ, c.address, err)
		}
	}
	allow, err := ParseAllow("10.1.0.0/16, 127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	p.Allow = allow
	for _, a := range []string{"10.1.2.3:50051", "127.0.0.1:9"} {
		if err := p.Check("byoc", a); err != nil {
			t.Errorf("allowed %s: %v", a, err)
		}
	}
	if err := p.Check("byoc", "127.0.0.2:9"); err == nil {
		t.Error("127.0.0.2 allowed by 127.0.0.1/32")
	}
	if _, err := ParseAllow("10.0.0.0/8,bogus"); err == nil {
		t.Error("a bad entry was accepted")
	}
}
