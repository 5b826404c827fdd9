// Package egress is what a sandbox may reach outside its host: the
// policy a capsule's creator chooses (checked by the control plane,
// enforced by the agent) and the ranges no policy opens by itself.
package egress

import (
	"errors"
	"fmt"
	"net/netip"
)

// Mode says what a sandbox may reach outside its host.
type Mode string

// Egress modes.
const (
	AllowAll  Mode = "allow_all" // everything public but Deny
	DenyAll   Mode = "deny_all"
	AllowList Mode = "allow_list" // Allow only
)

// MaxCIDRs bounds each of a policy's lists.
const MaxCIDRs = 64

// Policy is a sandbox's outbound policy. Whatever it says, private
// networks stay out of reach unless the operator allows them.
type Policy struct {
	Mode  Mode           `json:"mode"`
	Allow []netip.Prefix `json:"allow,omitempty"`
	Deny  []netip.Prefix `json:"deny,omitempty"`
}

// Validate rejects unknown modes and lists that do not fit their mode.
func (e Policy) Validate() error {
	switch e.Mode {
	case AllowAll, "":
		if len(e.Allow) > 0 {
			return errors.New("egress mode allow_all takes a deny list, not an allow list")
		}
	case DenyAll:
		if len(e.Allow)+len(e.Deny) > 0 {
			return errors.New("egress mode deny_all takes no list")
		}
	case AllowList:
		if len(e.Allow) == 0 || len(e.Deny) > 0 {
			return errors.New("egress mode allow_list needs an allow list of at least one CIDR, and no deny list")
		}
	default:
		return fmt.Errorf("unknown egress mode %q (allow_all, deny_all, allow_list)", e.Mode)
	}
	if len(e.Allow) > MaxCIDRs || len(e.Deny) > MaxCIDRs {
		return fmt.Errorf("at most %d CIDRs in each egress list", MaxCIDRs)
	}
	for _, p := range append(append([]netip.Prefix{}, e.Allow...), e.Deny...) {
		if !p.Addr().Is4() {
			return fmt.Errorf("egress CIDR %s: only IPv4 is supported", p)
		}
	}
	return nil
}

// PrivateRanges are kept from guests unless the operator allows part of
// them: the host's own networks and the other non-public ranges.
// Link-local (cloud metadata) is refused always, the host and other
// sandboxes by the host's own rules.
var PrivateRanges = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"), netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("172.16.0.0/12"), netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("240.0.0.0/4"),
}
