package network

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	egresspolicy "github.com/wrenn/wrenn/internal/egress"
)

// The firewall of one sandbox's namespace, as nftables tables of its own
// (one netlink transaction, where iptables took a process per rule):
//
//	ip wrenn:  the sandbox address NATed to the guest and back; the guest
//	           may not talk to the namespace, nor send from any address
//	           but its own; its egress by policy
//	ip6 wrenn: nothing of IPv6 from the guest goes anywhere (guests have
//	           no IPv6 address; the TAP's link-local one is not for them)
const (
	firewallTable = "wrenn"
	privateChain  = "private"
)

// rules is a chain's rules being built.
type rules struct {
	conn  *nftables.Conn
	chain *nftables.Chain
}

func (r rules) add(exprs ...expr.Any) {
	r.conn.AddRule(&nftables.Rule{Table: r.chain.Table, Chain: r.chain, Exprs: exprs})
}

// firewall writes the namespace's tables for allocation a and its policy.
func (m *Manager) firewall(conn *nftables.Conn, a Allocation, egress egresspolicy.Policy) {
	v4 := conn.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: firewallTable})
	base := func(t *nftables.Table, name string, kind nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) rules {
		accept := nftables.ChainPolicyAccept
		return rules{conn, conn.AddChain(&nftables.Chain{Name: name, Table: t, Type: kind, Hooknum: hook, Priority: prio, Policy: &accept})}
	}
	guest := GuestIP.As4()
	sandbox := a.SandboxIP.As4()

	// The sandbox address is the guest, both ways.
	pre := base(v4, "prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	pre.add(append(append(iif(a.NSVeth), daddr(netip.PrefixFrom(a.SandboxIP, 32))...),
		&expr.Immediate{Register: 1, Data: guest[:]},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1})...)
	post := base(v4, "postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	post.add(append(append(oif(a.NSVeth), saddr(netip.PrefixFrom(GuestIP, 32))...),
		&expr.Immediate{Register: 1, Data: sandbox[:]},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1})...)

	// The guest may not talk to the namespace itself.
	input := base(v4, "input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	input.add(append(append(iif(a.Tap), replies()...), accept())...)
	input.add(append(iif(a.Tap), drop())...)

	fwd := base(v4, "forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	// No address but the guest's own leaves its TAP.
	fwd.add(append(append(iif(a.Tap), notSaddr(GuestIP)...), drop())...)
	// Replies first, never link-local (cloud metadata), then the policy.
	fwd.add(append(append(iif(a.Tap), replies()...), accept())...)
	fwd.add(append(append(iif(a.Tap), daddr(netip.MustParsePrefix("169.254.0.0/16"))...), drop())...)
	if egress.Mode == egresspolicy.DenyAll {
		fwd.add(append(iif(a.Tap), drop())...)
	} else {
		for _, r := range m.Resolvers {
			for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
				fwd.add(append(append(append(iif(a.Tap), daddr(netip.PrefixFrom(r, 32))...), dport(proto, 53)...), accept())...)
			}
		}
		// Private ranges, in a chain of their own: the operator's
		// allowances return to the policy, the rest is dropped.
		private := rules{conn, conn.AddChain(&nftables.Chain{Name: privateChain, Table: v4})}
		for _, p := range m.PrivateAllow {
			private.add(append(daddr(p.Masked()), &expr.Verdict{Kind: expr.VerdictReturn})...)
		}
		for _, p := range egresspolicy.PrivateRanges {
			private.add(append(daddr(p), drop())...)
		}
		fwd.add(append(iif(a.Tap), &expr.Verdict{Kind: expr.VerdictJump, Chain: privateChain})...)
		for _, p := range egress.Deny {
			fwd.add(append(append(iif(a.Tap), daddr(p.Masked())...), drop())...)
		}
		if egress.Mode == egresspolicy.AllowList {
			for _, p := range egress.Allow {
				fwd.add(append(append(iif(a.Tap), daddr(p.Masked())...), accept())...)
			}
			fwd.add(append(iif(a.Tap), drop())...)
		}
	}

	if _, err := os.Stat("/proc/sys/net/ipv6"); err != nil {
		return // a kernel without IPv6 (ipv6.disable=1) carries none to drop
	}
	v6 := conn.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv6, Name: firewallTable})
	for _, hook := range []struct {
		name string
		hook *nftables.ChainHook
	}{{"input", nftables.ChainHookInput}, {"forward", nftables.ChainHookForward}} {
		c := base(v6, hook.name, nftables.ChainTypeFilter, hook.hook, nftables.ChainPriorityFilter)
		c.add(append(iif(a.Tap), drop())...)
	}
}

func accept() expr.Any { return &expr.Verdict{Kind: expr.VerdictAccept} }
func drop() expr.Any   { return &expr.Verdict{Kind: expr.VerdictDrop} }

// ifname is an interface name as nftables compares it.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func iif(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(name)},
	}
}

func oif(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(name)},
	}
}

// IPv4 header offsets of the source and destination addresses.
const (
	saddrOffset = 12
	daddrOffset = 16
)

func daddr(p netip.Prefix) []expr.Any { return inPrefix(daddrOffset, p, expr.CmpOpEq) }
func saddr(p netip.Prefix) []expr.Any { return inPrefix(saddrOffset, p, expr.CmpOpEq) }

func notSaddr(a netip.Addr) []expr.Any {
	return inPrefix(saddrOffset, netip.PrefixFrom(a, 32), expr.CmpOpNeq)
}

// inPrefix matches an IPv4 address of the header at offset against p.
func inPrefix(offset uint32, p netip.Prefix, op expr.CmpOp) []expr.Any {
	p = p.Masked()
	addr := p.Addr().As4()
	out := []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4}}
	if p.Bits() < 32 {
		mask := binary.BigEndian.AppendUint32(nil, ^uint32(0)<<(32-p.Bits()))
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)})
	}
	return append(out, &expr.Cmp{Op: op, Register: 1, Data: addr[:]})
}

// replies matches packets of connections already established.
func replies() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// dport matches a transport protocol and destination port.
func dport(proto byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
	}
}

// errFirewall wraps a failed transaction.
func errFirewall(ns string, err error) error {
	return fmt.Errorf("firewall of %s: %w", ns, err)
}
