package ports

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/tcpjoin"
)

// Forwarder listens on the guest's outward addresses for every port a
// server holds only on loopback, and joins each connection to that
// server, so the host (and through it the ingress) reaches it.
type Forwarder struct {
	Log *slog.Logger
	// ProcRoot is where the socket tables are read ("/proc").
	ProcRoot string
	// Addresses gives the addresses to listen on: the guest's own
	// non-loopback IPv4 addresses unless set.
	Addresses func() ([]netip.Addr, error)
	// Except are ports never forwarded (envd's own).
	Except []uint16
	// Interval is how often the socket tables are read (default 1 s).
	Interval time.Duration
	// Want, when set, says which ports may be forwarded (default: all).
	Want func(port uint16) bool

	mu       sync.Mutex
	forwards map[uint16]*forward
	failed   map[uint16]bool // logged once, retried quietly
}

type forward struct {
	target    netip.AddrPort
	listeners []net.Listener
	cancel    context.CancelFunc
}

// Run forwards until ctx ends, then closes every listener it made.
func (f *Forwarder) Run(ctx context.Context) {
	if f.ProcRoot == "" {
		f.ProcRoot = "/proc"
	}
	if f.Addresses == nil {
		f.Addresses = OutwardAddresses
	}
	if f.Interval <= 0 {
		f.Interval = time.Second
	}
	f.mu.Lock()
	f.forwards, f.failed = map[uint16]*forward{}, map[uint16]bool{}
	f.mu.Unlock()
	defer f.closeAll()
	tick := time.NewTicker(f.Interval)
	defer tick.Stop()
	for {
		if err := f.sync(ctx); err != nil {
			f.Log.Warn("port forwarding: reading listeners failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// Forwarded reports the ports being forwarded and where to.
func (f *Forwarder) Forwarded() map[uint16]netip.AddrPort {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[uint16]netip.AddrPort, len(f.forwards))
	for port, fw := range f.forwards {
		out[port] = fw.target
	}
	return out
}

// Own reports whether a listening socket is one of the forwarder's.
func (f *Forwarder) Own(ap netip.AddrPort) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ownLocked()[ap]
}

func (f *Forwarder) ownLocked() map[netip.AddrPort]bool {
	own := map[netip.AddrPort]bool{}
	for _, fw := range f.forwards {
		for _, l := range fw.listeners {
			if ap, err := netip.ParseAddrPort(l.Addr().String()); err == nil {
				own[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())] = true
			}
		}
	}
	return own
}

// sync starts forwards for new loopback-only ports and stops those whose
// server went away (or now listens outward itself).
func (f *Forwarder) sync(ctx context.Context) error {
	ls, err := Listening(f.ProcRoot)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	want := LoopbackOnly(ls, f.ownLocked(), f.Except...)
	for port, fw := range f.forwards {
		if target, ok := want[port]; !ok || target != fw.target.Addr() {
			f.stopLocked(port)
		}
	}
	for port := range f.failed {
		if _, ok := want[port]; !ok {
			delete(f.failed, port)
		}
	}
	for port, addr := range want {
		if _, ok := f.forwards[port]; ok || (f.Want != nil && !f.Want(port)) {
			continue
		}
		err := f.startLocked(ctx, port, netip.AddrPortFrom(addr, port))
		if err != nil && !f.failed[port] {
			f.failed[port] = true
			f.Log.Warn("port forwarding: cannot listen; retrying quietly", "port", port, "error", err)
		}
		if err == nil {
			delete(f.failed, port)
		}
	}
	return nil
}

func (f *Forwarder) startLocked(ctx context.Context, port uint16, target netip.AddrPort) error {
	addrs, err := f.Addresses()
	if err != nil {
		return err
	}
	if len(addrs) == 0 {
		return nil // no outward address yet
	}
	fctx, cancel := context.WithCancel(ctx)
	fw := &forward{target: target, cancel: cancel}
	var lc net.ListenConfig
	for _, a := range addrs {
		ln, err := lc.Listen(fctx, "tcp", net.JoinHostPort(a.String(), strconv.Itoa(int(port))))
		if err != nil {
			for _, l := range fw.listeners {
				_ = l.Close()
			}
			cancel()
			return err
		}
		fw.listeners = append(fw.listeners, ln)
		go f.serve(fctx, ln, target)
	}
	f.forwards[port] = fw
	f.Log.Info("forwarding a loopback server", "port", port, "to", target.String())
	return nil
}

func (f *Forwarder) stopLocked(port uint16) {
	fw := f.forwards[port]
	fw.cancel()
	for _, l := range fw.listeners {
		_ = l.Close()
	}
	delete(f.forwards, port)
	f.Log.Info("stopped forwarding", "port", port)
}

func (f *Forwarder) closeAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for port := range f.forwards {
		f.stopLocked(port)
	}
}

func (f *Forwarder) serve(ctx context.Context, ln net.Listener, target netip.AddrPort) {
	var d net.Dialer
	for {
		conn, err := ln.Accept()
		if err != nil {
			return // closed
		}
		go func() {
			defer conn.Close()
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			up, err := d.DialContext(dctx, "tcp", target.String())
			cancel()
			if err != nil {
				f.Log.Debug("port forwarding: dial", "to", target.String(), "error", err)
				return
			}
			defer up.Close()
			stop := context.AfterFunc(ctx, func() { _ = conn.Close(); _ = up.Close() })
			defer stop()
			tcpjoin.Join(conn, up)
		}()
	}
}

// OutwardAddresses are the guest's non-loopback IPv4 addresses: where the
// host reaches it.
func OutwardAddresses() ([]netip.Addr, error) {
	ifaces, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range ifaces {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		addr, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		addr = addr.Unmap()
		if addr.Is4() && !addr.IsLoopback() {
			out = append(out, addr)
		}
	}
	return out, nil
}
