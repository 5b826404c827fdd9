package ports

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"
)

const table = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   1: 00000000:C2EF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 100 0 0 10 0
   2: 0200000A:0016 0100000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 100 0 0 10 0
   3: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
   4: 0200000A:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 100 0 0 10 0
`

const table6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6666 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7777 1 0000000000000000 100 0 0 10 0
`

func TestParseTables(t *testing.T) {
	v4, err := parseTable([]byte(table))
	if err != nil {
		t.Fatal(err)
	}
	v6, err := parseTable([]byte(table6))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]uint64{}
	for _, l := range append(v4, v6...) {
		got[l.Addr.String()] = l.Inode
	}
	want := map[string]uint64{
		"127.0.0.1:8080": 1111, "0.0.0.0:49903": 2222, "127.0.0.1:3000": 4444, "10.0.0.2:3000": 5555,
		"[::1]:8081": 6666, "[::]:80": 7777,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("listeners %v, want %v (the established socket is left out)", got, want)
	}
	only := LoopbackOnly(append(v4, v6...), nil, 49903)
	if len(only) != 2 || only[8080] != netip.MustParseAddr("127.0.0.1") || only[8081] != netip.MustParseAddr("::1") {
		t.Fatalf("loopback-only ports %v: want 8080 and 8081 (3000 listens outward too, 80 on every address)", only)
	}
	if _, err := parseTable([]byte("header\n 0: zz:1F90 00000000:0000 0A 0 0 0 0 0 1 1\n")); err == nil {
		t.Fatal("a malformed address was accepted")
	}
}

// A server on IPv6 loopback only is reached through the forwarder's
// listener on another address, and the forward ends with the server.
func TestForwarderReachesALoopbackServer(t *testing.T) {
	srv, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback on this machine: %v", err)
	}
	port := srv.Addr().(*net.TCPAddr).Port
	go func() {
		for {
			c, err := srv.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				_, _ = io.WriteString(c, "echo: "+line)
			}()
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &Forwarder{Log: slog.New(slog.NewTextHandler(os.Stderr, nil)), Interval: 50 * time.Millisecond,
		Want:      func(p uint16) bool { return int(p) == port }, // leave this machine's own servers alone
		Addresses: func() ([]netip.Addr, error) { return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil }}
	done := make(chan struct{})
	go func() { f.Run(ctx); close(done) }()

	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var c net.Conn
	deadline := time.Now().Add(5 * time.Second)
	for {
		if c, err = net.Dial("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("the forward never listened on %s: %v", addr, err)
	}
	_, _ = io.WriteString(c, "hi\n")
	reply, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || reply != "echo: hi\n" {
		t.Fatalf("through the forward: %q %v", reply, err)
	}
	inv, err := Inventory("/proc", f)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range inv {
		if int(p.Port) == port {
			found = p.Forwarded && p.PID == os.Getpid() && len(p.Addresses) == 1 && p.Addresses[0] == "::1"
		}
	}
	if !found {
		t.Fatalf("inventory %+v does not show port %d on ::1, forwarded, owned by this process", inv, port)
	}

	srv.Close()
	deadline = time.Now().Add(5 * time.Second)
	for len(f.Forwarded()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if fw := f.Forwarded(); len(fw) > 0 {
		t.Fatalf("still forwarding %v after the server closed", fw)
	}
	cancel()
	<-done
}
