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
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

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
		_ = iptables(ctx, "-t", c.table, "-N", c.chain)
		if err := iptables(ctx, "-t", c.table, "-F", c.chain); err != nil {
			return err
		}
		for _, r := range c.rules {
			if err := iptables(ctx, append([]string{"-t", c.table, "-A", c.chain}, r...)...); err != nil {
				return err
			}
		}
		if iptables(ctx, "-t", c.table, "-C", c.parent, "-j", c.chain) != nil {
			if err := iptables(ctx, "-t", c.table, "-I", c.parent, "1", "-j", c.chain); err != nil {
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
	if err := ctx.Err(); err != nil {
		return err
	}
	ns, err := newNamedNS(a.NetNS)
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", a.NetNS, err)
	}
	defer ns.Close()
	inside, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", a.NetNS, err)
	}
	defer inside.Close()

	// The veth pair: the host's end here, the other in the namespace.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a.HostVeth}, PeerName: a.NSVeth, PeerNamespace: netlink.NsFd(int(ns))}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth %s: %w", a.HostVeth, err)
	}
	hostEnd, err := addressUp(&netlink.Handle{}, a.HostVeth, a.HostIP, 31) // the zero Handle is this namespace's
	if err != nil {
		return err
	}

	// Inside: loopback, the namespace's end of the veth with the default
	// route, and the VM's TAP device as the guest's gateway.
	lo, err := inside.LinkByName("lo")
	if err == nil {
		err = inside.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("loopback in %s: %w", a.NetNS, err)
	}
	nsEnd, err := addressUp(inside, a.NSVeth, a.NSIP, 31)
	if err != nil {
		return err
	}
	if err := inside.RouteAdd(&netlink.Route{LinkIndex: nsEnd.Attrs().Index, Gw: a.HostIP.AsSlice()}); err != nil {
		return fmt.Errorf("default route in %s: %w", a.NetNS, err)
	}
	if err := addTap(ns, a.Tap); err != nil {
		return err
	}
	if _, err := addressUp(inside, a.Tap, GatewayIP, guestPrefixLen); err != nil {
		return err
	}
	if err := inNS(ns, func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644) }); err != nil {
		return fmt.Errorf("forwarding in %s: %w", a.NetNS, err)
	}

	conn, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return errFirewall(a.NetNS, err)
	}
	m.firewall(conn, a, egress)
	if err := conn.Flush(); err != nil {
		return errFirewall(a.NetNS, err)
	}

	// The sandbox address is routed to the namespace.
	route := &netlink.Route{Dst: prefix(a.SandboxIP, 32), Gw: a.NSIP.AsSlice(), LinkIndex: hostEnd.Attrs().Index}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("route to %s: %w", a.SandboxIP, err)
	}
	return nil
}

// addressUp gives link name (through h, in h's namespace) its address and
// brings it up.
func addressUp(h *netlink.Handle, name string, a netip.Addr, bits int) (netlink.Link, error) {
	link, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", name, err)
	}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: prefix(a, bits)}); err != nil {
		return nil, fmt.Errorf("address of %s: %w", name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("%s up: %w", name, err)
	}
	return link, nil
}

func prefix(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// newNamedNS makes a network namespace with a name under /run/netns, as
// "ip netns add" does, and returns a handle to it; the calling goroutine's
// thread stays in its own namespace.
func newNamedNS(name string) (netns.NsHandle, error) {
	var ns netns.NsHandle
	err := onThread(func(netns.NsHandle) error {
		var err error
		ns, err = netns.NewNamed(name) // moves this thread into it
		return err
	})
	return ns, err
}

// inNS runs fn on a thread in namespace ns: what acts on the caller's own
// namespace (opening /dev/net/tun, /proc/sys/net) acts on ns.
func inNS(ns netns.NsHandle, fn func() error) error {
	return onThread(func(netns.NsHandle) error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter the namespace: %w", err)
		}
		return fn()
	})
}

// onThread runs fn on a locked thread and puts the thread back into the
// namespace it started in; a thread that cannot go back is never reused
// (it stays locked, so Go ends it with the goroutine).
func onThread(fn func(home netns.NsHandle) error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer home.Close()
		err = fn(home)
		if setErr := netns.Set(home); setErr != nil {
			done <- errors.Join(err, setErr)
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// addTap makes a persistent TAP device in ns that the agent's user opens
// (the VMM needs no CAP_NET_ADMIN for it), as "ip tuntap add ... user"
// does, with no packet information header. The kernel takes no "no
// group" from netlink's TUNSETGROUP: the group is the agent's own.
func addTap(ns netns.NsHandle, name string) error {
	return inNS(ns, func() error {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP,
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_ONE_QUEUE, Owner: uint32(os.Geteuid()), Group: uint32(os.Getegid())}
		if err := netlink.LinkAdd(tap); err != nil {
			return fmt.Errorf("TAP %s: %w", name, err)
		}
		for _, f := range tap.Fds {
			_ = f.Close() // persistent: the device outlives the descriptor
		}
		return nil
	})
}

// Teardown removes the sandbox's network; missing pieces are fine.
// Deleting the namespace removes the TAP device, the namespace end of the
// veth (and so the host end) and the namespace's own rules.
func (m *Manager) Teardown(_ context.Context, a Allocation) error {
	_ = netlink.RouteDel(&netlink.Route{Dst: prefix(a.SandboxIP, 32)})
	if m.nsExists(a.NetNS) {
		if err := deleteNamedNS(a.NetNS); err != nil {
			return fmt.Errorf("delete network namespace %s: %w", a.NetNS, err)
		}
	}
	// Deleting the namespace removes the host end of the veth too, but
	// asynchronously: it may vanish between the check and the delete.
	if link, err := netlink.LinkByName(a.HostVeth); err == nil {
		if err := netlink.LinkDel(link); err != nil && linkExists(a.HostVeth) {
			return fmt.Errorf("delete %s: %w", a.HostVeth, err)
		}
	}
	return nil
}

// deleteNamedNS undoes newNamedNS, as "ip netns del" does; a name left
// without its mount (a crash between the two) is removed too.
func deleteNamedNS(name string) error {
	path := filepath.Join("/run/netns", name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Exists reports whether the slot's namespace is there.
func (m *Manager) Exists(a Allocation) bool { return m.nsExists(a.NetNS) }

// Allocation is ForSlot, for the sandbox manager's Network interface.
func (m *Manager) Allocation(slot int) (Allocation, error) { return ForSlot(slot) }

// Slots is Namespaces, for the sandbox manager's Network interface.
func (m *Manager) Slots() ([]int, error) { return Namespaces() }

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

// iptables changes the host's own firewall. The host rules stay in
// iptables, whichever backend the host uses: they must sit in the host's
// FORWARD and INPUT chains, ahead of what else the operator has there (a
// policy of DROP, Docker's rules), which a table of Wrenn's own could not
// override.
func iptables(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "iptables", append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ScratchTap adds a TAP device to a sandbox's namespace that is never up
// and has no address: a VMM that only converts a saved VM's state (a
// memory template) needs the same kind of network card the VM had, with
// no network behind it. remove deletes it.
func (m *Manager) ScratchTap(_ context.Context, a Allocation, name string) (remove func(), err error) {
	if name == a.Tap || !validTapName.MatchString(name) {
		return nil, fmt.Errorf("scratch TAP name %q", name)
	}
	ns, err := netns.GetFromName(a.NetNS)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", a.NetNS, err)
	}
	if err := addTap(ns, name); err != nil {
		ns.Close()
		return nil, err
	}
	return func() {
		defer ns.Close()
		err := inNS(ns, func() error {
			link, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			return netlink.LinkDel(link)
		})
		if err != nil {
			m.Log.Warn("could not remove a scratch TAP device", "netns", a.NetNS, "tap", name, "error", err)
		}
	}, nil
}

var validTapName = regexp.MustCompile(`^[a-z][a-z0-9]{0,14}$`)
