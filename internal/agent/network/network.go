// Package network gives each sandbox its own network: a namespace holding
// the VM's TAP device, a veth pair to the host, NAT between the guest's
// fixed address and a host-reachable address for the sandbox, and firewall
// rules that keep sandboxes away from each other and from the host.
//
// Addresses come from the sandbox's slot number, so they never collide and
// are reused after destroy:
//
//	guest eth0      169.254.0.21/30 (the same in every namespace)
//	TAP (gateway)   169.254.0.22/30
//	veth, host end  10.200.0.0/16 + 2*slot      (/31)
//	veth, ns end    10.200.0.0/16 + 2*slot + 1
//	sandbox address 10.201.0.0/16 + slot         (routed to the namespace, DNAT to the guest)
package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"

	egresspolicy "github.com/wrenn/wrenn/internal/egress"
)

// MaxSlot is the highest slot: the veth range is a /16 of /31 pairs.
const MaxSlot = 32767

var (
	vethBase    = netip.MustParseAddr("10.200.0.0")
	sandboxBase = netip.MustParseAddr("10.201.0.0")
	// VethRange and SandboxRange are what the host rules match.
	VethRange    = netip.MustParsePrefix("10.200.0.0/16")
	SandboxRange = netip.MustParsePrefix("10.201.0.0/16")
	// GuestIP and GatewayIP are the same inside every namespace.
	GuestIP   = netip.MustParseAddr("169.254.0.21")
	GatewayIP = netip.MustParseAddr("169.254.0.22")
)

const (
	guestPrefixLen = 30
	tapName        = "tap0"
	ifacePrefix    = "wrn" // host-side veth names: wrn<slot>h; the host rules match wrn+
	privateChain   = "WRENN-PRIVATE"
)

// Allocation is one sandbox's network, derived from its slot.
type Allocation struct {
	Slot      int        `json:"slot"`
	NetNS     string     `json:"netns"`
	HostVeth  string     `json:"host_veth"`
	NSVeth    string     `json:"ns_veth"`
	Tap       string     `json:"tap"`
	HostIP    netip.Addr `json:"host_ip"`
	NSIP      netip.Addr `json:"ns_ip"`
	SandboxIP netip.Addr `json:"sandbox_ip"`
	MAC       string     `json:"mac"`
}

// SlotRange is the slots one agent may use. Agents sharing a machine
// (tests, or several agents on one big host) get disjoint ranges, so
// their namespaces, interfaces and addresses never meet.
type SlotRange struct{ First, Last int }

// AllSlots is the whole range, for the usual one agent per host.
var AllSlots = SlotRange{1, MaxSlot}

// ParseSlotRange reads "first-last", e.g. "1-1000".
func ParseSlotRange(s string) (SlotRange, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.Atoi(strings.TrimSpace(a))
	last, err2 := strconv.Atoi(strings.TrimSpace(b))
	if !ok || err1 != nil || err2 != nil || first < 1 || last > MaxSlot || first > last {
		return SlotRange{}, fmt.Errorf("slot range %q: want first-last within 1-%d", s, MaxSlot)
	}
	return SlotRange{first, last}, nil
}

// Contains reports whether slot is in the range.
func (r SlotRange) Contains(slot int) bool { return slot >= r.First && slot <= r.Last }

// ForSlot derives the allocation for a slot (1..MaxSlot).
func ForSlot(slot int) (Allocation, error) {
	if slot < 1 || slot > MaxSlot {
		return Allocation{}, fmt.Errorf("network slot %d is outside 1..%d", slot, MaxSlot)
	}
	host := addrPlus(vethBase, 2*slot)
	return Allocation{
		Slot:      slot,
		NetNS:     fmt.Sprintf("wrenn-%d", slot),
		HostVeth:  fmt.Sprintf("%s%dh", ifacePrefix, slot),
		NSVeth:    fmt.Sprintf("%s%dn", ifacePrefix, slot),
		Tap:       tapName,
		HostIP:    host,
		NSIP:      host.Next(),
		SandboxIP: addrPlus(sandboxBase, slot),
		// Locally administered, unicast; the slot keeps it unique per host.
		MAC: fmt.Sprintf("02:fc:%02x:%02x:%02x:%02x", byte(slot>>24), byte(slot>>16), byte(slot>>8), byte(slot)),
	}, nil
}

func addrPlus(a netip.Addr, n int) netip.Addr {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// KernelArgs configure the guest's eth0 through the kernel's ip= option.
func (a Allocation) KernelArgs(dns []netip.Addr) []string {
	args := []string{fmt.Sprintf("ip=%s::%s:255.255.255.252::eth0:off", GuestIP, GatewayIP)}
	if len(dns) > 0 {
		s := make([]string, len(dns))
		for i, d := range dns {
			s[i] = d.String()
		}
		args = append(args, "wrenn.dns="+strings.Join(s, ","))
	}
	return args
}

// Manager creates and removes sandbox networks.
type Manager struct {
	Log *slog.Logger
	// PrivateAllow are parts of egress.PrivateRanges guests may reach (the
	// operator's --guest-private-egress); each sandbox's policy still applies.
	PrivateAllow []netip.Prefix
	// Resolvers are the guests' DNS servers, reachable on port 53 in every
	// mode but deny_all (they may be private).
	Resolvers []netip.Addr
}

// PrepareHost enables forwarding and installs the host-wide rules once;
// it is safe to call on every agent start.
func (m *Manager) PrepareHost(ctx context.Context) error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable IP forwarding: %w", err)
	}
	veths := ifacePrefix + "+"
	chains := []struct {
		table, chain, parent string
		rules                [][]string
	}{
		{"filter", "WRENN-FORWARD", "FORWARD", [][]string{
			// Sandboxes never reach each other, through either address.
			{"-i", veths, "-d", SandboxRange.String(), "-j", "DROP"},
			{"-i", veths, "-d", VethRange.String(), "-j", "DROP"},
			{"-i", veths, "-j", "ACCEPT"},
			// From outside, only replies may enter a sandbox.
			{"-o", veths, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
			{"-o", veths, "-j", "DROP"},
		}},
		{"filter", "WRENN-INPUT", "INPUT", [][]string{
			// A sandbox may not open connections to the host itself
			// (agent, control plane, anything listening); replies are fine.
			{"-i", veths, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
			{"-i", veths, "-j", "DROP"},
		}},
		{"nat", "WRENN-POSTROUTING", "POSTROUTING", [][]string{
			{"-s", SandboxRange.String(), "!", "-o", veths, "-j", "MASQUERADE"},
		}},
	}
	for _, c := range chains {
		// Rebuild the chain from scratch so rule changes across versions apply.
		_ = iptables(ctx, "", "-t", c.table, "-N", c.chain)
		if err := iptables(ctx, "", "-t", c.table, "-F", c.chain); err != nil {
			return err
		}
		for _, r := range c.rules {
			if err := iptables(ctx, "", append([]string{"-t", c.table, "-A", c.chain}, r...)...); err != nil {
				return err
			}
		}
		if iptables(ctx, "", "-t", c.table, "-C", c.parent, "-j", c.chain) != nil {
			if err := iptables(ctx, "", "-t", c.table, "-I", c.parent, "1", "-j", c.chain); err != nil {
				return err
			}
		}
	}
	return nil
}

// Setup creates the sandbox's network. It first removes whatever a crashed
// earlier attempt left for this slot, and on failure removes what it made.
func (m *Manager) Setup(ctx context.Context, a Allocation, egress egresspolicy.Policy) error {
	if err := egress.Validate(); err != nil {
		return err
	}
	if err := m.Teardown(ctx, a); err != nil {
		return fmt.Errorf("clear slot %d: %w", a.Slot, err)
	}
	if err := m.setup(ctx, a, egress); err != nil {
		_ = m.Teardown(context.Background(), a)
		return fmt.Errorf("network for slot %d: %w", a.Slot, err)
	}
	m.Log.Debug("sandbox network ready", "slot", a.Slot, "netns", a.NetNS, "sandbox_ip", a.SandboxIP)
	return nil
}

func (m *Manager) setup(ctx context.Context, a Allocation, egress egresspolicy.Policy) error {
	ns := a.NetNS
	gw := fmt.Sprintf("%s/%d", GatewayIP, guestPrefixLen)
	steps := [][]string{
		{"netns", "add", ns},
		{"-n", ns, "link", "set", "lo", "up"},
		{"link", "add", a.HostVeth, "type", "veth", "peer", "name", a.NSVeth, "netns", ns},
		{"addr", "add", a.HostIP.String() + "/31", "dev", a.HostVeth},
		{"link", "set", a.HostVeth, "up"},
		{"-n", ns, "addr", "add", a.NSIP.String() + "/31", "dev", a.NSVeth},
		{"-n", ns, "link", "set", a.NSVeth, "up"},
		{"-n", ns, "route", "add", "default", "via", a.HostIP.String()},
		// Owned by the agent's user, so the VMM opens it without CAP_NET_ADMIN.
		{"-n", ns, "tuntap", "add", a.Tap, "mode", "tap", "user", strconv.Itoa(os.Geteuid())},
		{"-n", ns, "addr", "add", gw, "dev", a.Tap},
		{"-n", ns, "link", "set", a.Tap, "up"},
		{"route", "replace", a.SandboxIP.String() + "/32", "via", a.NSIP.String(), "dev", a.HostVeth},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			return err
		}
	}
	if err := runIn(ctx, ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"); err != nil {
		return err
	}
	guest := GuestIP.String()
	// Private ranges, in a chain of the namespace's own: the operator's
	// allowances return to the policy, the rest is dropped.
	if err := iptables(ctx, ns, "-N", privateChain); err != nil {
		return err
	}
	for _, p := range m.PrivateAllow {
		if err := iptables(ctx, ns, "-A", privateChain, "-d", p.Masked().String(), "-j", "RETURN"); err != nil {
			return err
		}
	}
	for _, p := range egresspolicy.PrivateRanges {
		if err := iptables(ctx, ns, "-A", privateChain, "-d", p.String(), "-j", "DROP"); err != nil {
			return err
		}
	}
	rules := [][]string{
		// The sandbox address is the guest, both ways.
		{"-t", "nat", "-A", "PREROUTING", "-i", a.NSVeth, "-d", a.SandboxIP.String(), "-j", "DNAT", "--to-destination", guest},
		{"-t", "nat", "-A", "POSTROUTING", "-o", a.NSVeth, "-s", guest, "-j", "SNAT", "--to-source", a.SandboxIP.String()},
		// The guest may not talk to the namespace itself.
		{"-A", "INPUT", "-i", a.Tap, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
		{"-A", "INPUT", "-i", a.Tap, "-j", "DROP"},
		// Guest egress: replies first, never link-local (cloud metadata), then the policy.
		{"-A", "FORWARD", "-i", a.Tap, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
		{"-A", "FORWARD", "-i", a.Tap, "-d", "169.254.0.0/16", "-j", "DROP"},
	}
	if egress.Mode == egresspolicy.DenyAll {
		rules = append(rules, []string{"-A", "FORWARD", "-i", a.Tap, "-j", "DROP"})
	} else {
		for _, r := range m.Resolvers {
			for _, proto := range []string{"udp", "tcp"} {
				rules = append(rules, []string{"-A", "FORWARD", "-i", a.Tap, "-d", r.String(), "-p", proto, "--dport", "53", "-j", "ACCEPT"})
			}
		}
		rules = append(rules, []string{"-A", "FORWARD", "-i", a.Tap, "-j", privateChain})
		for _, p := range egress.Deny {
			rules = append(rules, []string{"-A", "FORWARD", "-i", a.Tap, "-d", p.Masked().String(), "-j", "DROP"})
		}
		if egress.Mode == egresspolicy.AllowList {
			for _, p := range egress.Allow {
				rules = append(rules, []string{"-A", "FORWARD", "-i", a.Tap, "-d", p.Masked().String(), "-j", "ACCEPT"})
			}
			rules = append(rules, []string{"-A", "FORWARD", "-i", a.Tap, "-j", "DROP"})
		}
	}
	for _, r := range rules {
		if err := iptables(ctx, ns, r...); err != nil {
			return err
		}
	}
	return nil
}

// Teardown removes the sandbox's network; missing pieces are fine.
// Deleting the namespace removes the TAP device, the namespace end of the
// veth (and so the host end) and the namespace's own rules.
func (m *Manager) Teardown(ctx context.Context, a Allocation) error {
	_ = ip(ctx, "route", "del", a.SandboxIP.String()+"/32")
	if m.nsExists(a.NetNS) {
		if err := ip(ctx, "netns", "del", a.NetNS); err != nil {
			return err
		}
	}
	// Deleting the namespace removes the host end of the veth too, but
	// asynchronously: it may vanish between the check and the delete.
	if linkExists(a.HostVeth) {
		if err := ip(ctx, "link", "del", a.HostVeth); err != nil && linkExists(a.HostVeth) {
			return err
		}
	}
	return nil
}

// Exists reports whether the slot's namespace is there.
func (m *Manager) Exists(a Allocation) bool { return m.nsExists(a.NetNS) }

func (m *Manager) nsExists(name string) bool {
	_, err := os.Stat("/run/netns/" + name)
	return err == nil
}

// Namespaces lists the wrenn-<slot> namespaces on the host, so an agent can
// remove those no sandbox owns.
func Namespaces() ([]int, error) {
	entries, err := os.ReadDir("/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var slots []int
	for _, e := range entries {
		if s, ok := strings.CutPrefix(e.Name(), "wrenn-"); ok {
			if n, err := strconv.Atoi(s); err == nil {
				slots = append(slots, n)
			}
		}
	}
	return slots, nil
}

func linkExists(name string) bool {
	_, err := os.Stat("/sys/class/net/" + name)
	return err == nil
}

func ip(ctx context.Context, args ...string) error {
	return run(ctx, "ip", args...)
}

func iptables(ctx context.Context, ns string, args ...string) error {
	if ns == "" {
		return run(ctx, "iptables", append([]string{"-w"}, args...)...)
	}
	return runIn(ctx, ns, "iptables", append([]string{"-w"}, args...)...)
}

func runIn(ctx context.Context, ns, name string, args ...string) error {
	return run(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ScratchTap adds a TAP device to a sandbox's namespace that is never up
// and has no address: a VMM that only converts a saved VM's state (a
// memory template) needs the same kind of network card the VM had, with
// no network behind it. remove deletes it.
func (m *Manager) ScratchTap(ctx context.Context, a Allocation, name string) (remove func(), err error) {
	if name == a.Tap || !validTapName.MatchString(name) {
		return nil, fmt.Errorf("scratch TAP name %q", name)
	}
	if err := ip(ctx, "-n", a.NetNS, "tuntap", "add", name, "mode", "tap", "user", strconv.Itoa(os.Geteuid())); err != nil {
		return nil, err
	}
	return func() {
		if err := ip(context.Background(), "-n", a.NetNS, "link", "del", name); err != nil {
			m.Log.Warn("could not remove a scratch TAP device", "netns", a.NetNS, "tap", name, "error", err)
		}
	}, nil
}

var validTapName = regexp.MustCompile(`^[a-z][a-z0-9]{0,14}$`)
