package egress

import (
	"net/netip"
	"testing"
)

func TestValidate(t *testing.T) {
	p := func(s string) []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix(s)} }
	many := make([]netip.Prefix, MaxCIDRs+1)
	for i := range many {
		many[i] = netip.MustParsePrefix("198.51.100.0/24")
	}
	for _, c := range []struct {
		policy Policy
		ok     bool
	}{
		{Policy{}, true},
		{Policy{Mode: AllowAll, Deny: p("198.51.100.0/24")}, true},
		{Policy{Mode: DenyAll}, true},
		{Policy{Mode: AllowList, Allow: p("203.0.113.0/24")}, true},
		{Policy{Mode: AllowAll, Allow: p("203.0.113.0/24")}, false},
		{Policy{Mode: DenyAll, Deny: p("203.0.113.0/24")}, false},
		{Policy{Mode: AllowList}, false},
		{Policy{Mode: AllowList, Allow: p("2001:db8::/32")}, false},
		{Policy{Mode: AllowAll, Deny: many}, false},
		{Policy{Mode: "open_sesame"}, false},
	} {
		if err := c.policy.Validate(); (err == nil) != c.ok {
			t.Errorf("%+v: %v", c.policy, err)
		}
	}
}
