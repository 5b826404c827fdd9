// Package hostaddr decides which addresses the control plane may dial as
// a host agent. A host registers its own address, and the control plane
// (and its reconciler, every few seconds) dials it from inside the
// operator's network: a tenant's BYOC host must not be able to aim those
// calls at the control plane's own machine, its private network or a
// cloud metadata service. The operator may allow ranges explicitly.
package hostaddr

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// ErrNotAllowed is wrapped by every refusal.
var ErrNotAllowed = errors.New("address not allowed for a host agent")

// Policy says which agent addresses are acceptable.
type Policy struct {
	// Allow lists ranges accepted whatever else is said (the operator's
	// WRENN_HOST_ADDRESS_ALLOW), for instance a private network where
	// trusted teams run BYOC hosts, or loopback on a test machine.
	Allow []netip.Prefix
	// Own are the control plane's own addresses (its machine's
	// interfaces); BYOC hosts may not name them.
	Own []netip.Addr
}

// never is refused for every host: nothing an agent listens on lives
// there, and cloud metadata services do.
var never = mustPrefixes(
	"0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
	"::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128",
)

// privateRanges are refused for BYOC hosts: the platform's own networks.
var privateRanges = mustPrefixes(
	"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
	"192.0.0.0/24", "198.18.0.0/15", "::1/128", "fc00::/7", "64:ff9b::/96",
)

func mustPrefixes(list ...string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(list))
	for _, s := range list {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// ParseAllow reads a comma-separated list of CIDRs or addresses.
func ParseAllow(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("%q is not a CIDR or an address", f)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// LocalAddrs lists the addresses of this machine's interfaces.
func LocalAddrs() []netip.Addr {
	addrs, _ := net.InterfaceAddrs()
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out
}

// Split takes "host:port" or "https://host:port" apart.
func Split(address string) (host string, port string, err error) {
	return net.SplitHostPort(strings.TrimPrefix(address, "https://"))
}

// Check says whether a host of type hostType ("regular" or "byoc") may be
// reached at address. BYOC hosts must name a public IP address (a name
// could resolve elsewhere at every dial); regular hosts, which platform
// admins add, may use names and private networks.
func (p Policy) Check(hostType, address string) error {
	host, _, err := Split(address)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotAllowed, err)
	}
	ip, err := netip.ParseAddr(strings.Trim(host, "[]"))
	if err != nil {
		if hostType == "byoc" {
			return fmt.Errorf("%w: a BYOC host registers an IP address, not the name %q", ErrNotAllowed, host)
		}
		return nil
	}
	return p.CheckIP(hostType, ip)
}

// CheckIP is Check for an address already resolved.
func (p Policy) CheckIP(hostType string, ip netip.Addr) error {
	ip = ip.Unmap().WithZone("")
	for _, a := range p.Allow {
		if a.Contains(ip) {
			return nil
		}
	}
	for _, n := range never {
		if n.Contains(ip) {
			return fmt.Errorf("%w: %s is link-local, multicast or unspecified (cloud metadata services live there)", ErrNotAllowed, ip)
		}
	}
	if hostType != "byoc" {
		return nil
	}
	for _, n := range privateRanges {
		if n.Contains(ip) {
			return fmt.Errorf("%w: %s is loopback or in a private range; a BYOC host registers a public address (an operator can allow ranges with WRENN_HOST_ADDRESS_ALLOW)", ErrNotAllowed, ip)
		}
	}
	for _, own := range p.Own {
		if own == ip {
			return fmt.Errorf("%w: %s is the control plane's own address", ErrNotAllowed, ip)
		}
	}
	return nil
}
