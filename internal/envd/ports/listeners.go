// Package ports knows which TCP ports servers in the guest listen on, and
// makes the ones bound only to loopback (127.0.0.1, ::1) reachable from
// the host, as users expect of "localhost" servers they start in a sandbox.
package ports

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Listener is one listening TCP socket.
type Listener struct {
	Addr  netip.AddrPort
	Inode uint64
}

// tcpListen is the socket state LISTEN in /proc/net/tcp.
const tcpListen = "0A"

// maxTable bounds what one /proc/net/tcp* read may hold (a guest with
// thousands of sockets still fits).
const maxTable = 16 << 20

// Listening reads the listening TCP sockets of the network namespace
// procRoot (normally "/proc") sees, IPv4 and IPv6.
func Listening(procRoot string) ([]Listener, error) {
	var out []Listener
	for _, name := range []string{"tcp", "tcp6"} {
		data, err := readBounded(filepath.Join(procRoot, "net", name))
		if os.IsNotExist(err) {
			continue // no IPv6 in this kernel
		}
		if err != nil {
			return nil, err
		}
		ls, err := parseTable(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, ls...)
	}
	return out, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(&limited{f: f, left: maxTable}); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

type limited struct {
	f    *os.File
	left int
}

func (l *limited) Read(p []byte) (int, error) {
	if l.left <= 0 {
		return 0, fmt.Errorf("%s is larger than %d bytes", l.f.Name(), maxTable)
	}
	if len(p) > l.left {
		p = p[:l.left]
	}
	n, err := l.f.Read(p)
	l.left -= n
	return n, err
}

// parseTable reads the LISTEN rows of a /proc/net/tcp or tcp6 table:
// "sl local_address rem_address st ... uid timeout inode ...".
func parseTable(data []byte) ([]Listener, error) {
	var out []Listener
	sc := bufio.NewScanner(bytes.NewReader(data))
	first := true
	for sc.Scan() {
		if first { // the header line
			first = false
			continue
		}
		f := strings.Fields(sc.Text())
		if len(f) < 10 || f[3] != tcpListen {
			continue
		}
		ap, err := parseAddrPort(f[1])
		if err != nil {
			return nil, err
		}
		inode, _ := strconv.ParseUint(f[9], 10, 64)
		out = append(out, Listener{Addr: ap, Inode: inode})
	}
	return out, sc.Err()
}

// parseAddrPort decodes "0100007F:1F90": the address as the kernel's
// 32-bit words in host (little-endian) order, the port in big-endian hex.
func parseAddrPort(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q has no port", s)
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port in %q: %w", s, err)
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q is not 4 or 16 hex bytes", a)
	}
	// Each 32-bit word is stored little-endian; put it in network order.
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(raw[i:], binary.LittleEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
}

// LoopbackOnly are the ports every listener of which is bound to a
// loopback address, leaving out the sockets in skip (our own) and the
// ports in except.
func LoopbackOnly(ls []Listener, skip map[netip.AddrPort]bool, except ...uint16) map[uint16]netip.Addr {
	out := map[uint16]netip.Addr{}
	reachable := map[uint16]bool{}
	for _, l := range ls {
		if skip[l.Addr] || slices.Contains(except, l.Addr.Port()) {
			continue
		}
		port := l.Addr.Port()
		if !l.Addr.Addr().IsLoopback() {
			reachable[port] = true
			continue
		}
		// Prefer forwarding to IPv4 loopback when a server has both.
		if prev, ok := out[port]; !ok || (prev.Is6() && l.Addr.Addr().Is4()) {
			out[port] = l.Addr.Addr()
		}
	}
	for port := range reachable {
		delete(out, port)
	}
	return out
}
