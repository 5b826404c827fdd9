package agenttest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// outsideHost is a test host in its own namespace, routed from the host,
// standing in for "the internet" so no test traffic leaves the machine:
// its address is in a documentation range (TEST-NET-2), public as far as
// the egress rules go, and routed only to that namespace here. It
// answers HTTP on TCP 8080 with "outside".
func outsideHost(t *testing.T) string {
	return testHost(t, "wrenntest-out", "wrtout", "198.51.100.1", "198.51.100.2")
}

// privateHost is another such host on a private range (the host's LAN, as
// far as a guest can tell).
func privateHost(t *testing.T) string {
	return testHost(t, "wrenntest-lan", "wrtlan", "10.199.0.1", "10.199.0.2")
}

func testHost(t *testing.T, ns, ifPrefix, hostAddr, nsAddr string) string {
	t.Helper()
	hostIf, nsIf := ifPrefix+"-h", ifPrefix+"-n"
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	_ = exec.Command("ip", "netns", "del", ns).Run()
	run("ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	run("ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", ns)
	run("ip", "addr", "add", hostAddr+"/30", "dev", hostIf) // the /30 is routed here, nowhere else
	run("ip", "link", "set", hostIf, "up")
	run("ip", "-n", ns, "addr", "add", nsAddr+"/30", "dev", nsIf)
	run("ip", "-n", ns, "link", "set", nsIf, "up")
	run("ip", "-n", ns, "link", "set", "lo", "up")
	run("ip", "-n", ns, "route", "add", "default", "via", hostAddr)
	// socat unescapes its address text, so the reply comes from a script.
	reply := filepath.Join(t.TempDir(), "reply.sh")
	script := "#!/bin/sh\nprintf 'HTTP/1.0 200 OK\\r\\nContent-Length: 8\\r\\n\\r\\noutside\\n'\n"
	if err := os.WriteFile(reply, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	server := exec.Command("ip", "netns", "exec", ns, "socat", "TCP-LISTEN:8080,reuseaddr,fork", "EXEC:"+reply)
	if err := server.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = server.Process.Kill(); _ = server.Wait() })
	return nsAddr
}

// listenUDP collects for a few seconds what reaches a socat address in
// namespace ns; the result waits for the end.
func listenUDP(t *testing.T, ns, address string) func() string {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "timeout", "6", "socat", "-u", address, "STDOUT")
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // listening
	return func() string {
		_ = cmd.Wait()
		return out.String()
	}
}

// reach reports whether a sandbox can open a TCP connection to addr:port.
func (a *agent) reach(ctx context.Context, id, addr string, port int) bool {
	script := fmt.Sprintf("timeout 3 bash -c 'exec 3<>/dev/tcp/%s/%d' 2>/dev/null && echo open || echo closed", addr, port)
	out, _ := a.sh(ctx, id, script)
	return strings.TrimSpace(out) == "open"
}

func TestIsolationAndEgress(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 4*time.Minute)
	outside := outsideHost(t)
	lan := privateHost(t)

	open := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-open"})
	denied := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-denied", Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_DENY_ALL}})
	listed := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-listed", Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_LIST, AllowCidrs: []string{"198.51.100.0/30", "10.199.0.0/30"}}})
	other := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-otherlist", Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_LIST, AllowCidrs: []string{"192.0.2.0/24"}}})
	blocked := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-denylist", Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_ALLOW_ALL, DenyCidrs: []string{"198.51.100.0/30"}}})
	if open.GetAddress() == denied.GetAddress() {
		t.Fatalf("two sandboxes share the address %s", open.GetAddress())
	}

	// Egress policy.
	if !a.reach(ctx, open.GetId(), outside, 8080) {
		t.Fatal("allow_all sandbox cannot reach the outside host")
	}
	// Retried: with four TCG guests booting on two cores, one attempt can outlast its time limit.
	var curlOut string
	for range 3 {
		if curlOut, _ = a.sh(ctx, open.GetId(), "curl -s --max-time 15 http://"+outside+":8080/"); strings.Contains(curlOut, "outside") {
			break
		}
	}
	if !strings.Contains(curlOut, "outside") {
		t.Fatalf("curl through NAT: %q", curlOut)
	}
	if a.reach(ctx, denied.GetId(), outside, 8080) {
		t.Fatal("deny_all sandbox reached the outside host")
	}
	if !a.reach(ctx, listed.GetId(), outside, 8080) {
		t.Fatal("allow_list sandbox cannot reach an allowed CIDR")
	}
	if a.reach(ctx, other.GetId(), outside, 8080) {
		t.Fatal("allow_list sandbox reached a CIDR not on its list")
	}
	if a.reach(ctx, blocked.GetId(), outside, 8080) {
		t.Fatal("a sandbox reached a CIDR on its deny list")
	}
	// Private networks (the host's LAN) are out of reach by default, even
	// for a policy that lists them: only the operator opens them.
	for _, sb := range []*pb.Sandbox{open, listed, blocked} {
		if a.reach(ctx, sb.GetId(), lan, 8080) {
			t.Fatalf("%s reached a private address without the operator's allowance", sb.GetId())
		}
	}

	// Sandboxes cannot reach each other, by address or through the veths.
	if a.reach(ctx, open.GetId(), denied.GetAddress(), 49983) {
		t.Fatal("one sandbox reached another's envd")
	}
	// Nor the host: the agent's port, or anything else on it.
	agentPort := a.addr[strings.LastIndex(a.addr, ":")+1:]
	var port int
	fmt.Sscanf(agentPort, "%d", &port)
	for _, hostAddr := range []string{"10.200.0.2", "10.199.0.1", "127.0.0.1"} {
		if a.reach(ctx, open.GetId(), hostAddr, port) {
			t.Fatalf("sandbox reached the agent's port on %s", hostAddr)
		}
	}
	// Nor link-local metadata services.
	if a.reach(ctx, open.GetId(), "169.254.169.254", 80) {
		t.Fatal("sandbox reached 169.254.169.254")
	}
	// A guest that takes another address gets nothing through with it,
	// and no IPv6 leaves its TAP (not even to the namespace).
	heard := listenUDP(t, "wrenntest-out", "UDP4-RECV:9998")
	a.sh(ctx, open.GetId(), "sudo ip addr add 169.254.0.25/32 dev eth0; for i in 1 2 3; do "+
		"echo spoofed | socat -u - UDP4-DATAGRAM:"+outside+":9998,bind=169.254.0.25; echo real | socat -u - UDP4-DATAGRAM:"+outside+":9998; sleep 0.3; done; "+
		"sudo ip addr del 169.254.0.25/32 dev eth0")
	if got := heard(); !strings.Contains(got, "real") || strings.Contains(got, "spoofed") {
		t.Fatalf("the outside host heard %q from the guest: its own address must get through, no other", got)
	}
	ip := net.ParseIP(strings.Split(open.GetAddress(), ":")[0]).To4()
	netnsName := fmt.Sprintf("wrenn-%d", int(ip[2])<<8|int(ip[3]))
	heard6 := listenUDP(t, netnsName, "UDP6-RECV:9999")
	a.sh(ctx, open.GetId(), "for i in 1 2 3; do echo heard6 | socat -u - 'UDP6-DATAGRAM:[ff02::1%eth0]:9999'; sleep 0.3; done")
	if got := heard6(); strings.Contains(got, "heard6") {
		t.Fatal("IPv6 from the guest reached its namespace")
	}
	// The host still reaches every sandbox's envd.
	for _, sb := range []*pb.Sandbox{open, denied, listed, other, blocked} {
		if out, code := a.sh(ctx, sb.GetId(), "echo alive"); out != "alive\n" || code != 0 {
			t.Fatalf("%s unreachable from the host", sb.GetId())
		}
	}
}

// The operator opens a private range to guests (--guest-private-egress);
// each sandbox's own policy still applies to it.
func TestPrivateEgressNeedsTheOperator(t *testing.T) {
	a := newAgent(t, "--guest-private-egress", "10.199.0.0/30")
	ctx := testCtx(t, 3*time.Minute)
	lan := privateHost(t)
	open := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-lan-open"})
	denied := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-lan-denied", Egress: &pb.EgressPolicy{Mode: pb.EgressPolicy_MODE_DENY_ALL}})
	if !a.reach(ctx, open.GetId(), lan, 8080) {
		t.Fatal("a private range the operator allows is out of reach")
	}
	if a.reach(ctx, denied.GetId(), lan, 8080) {
		t.Fatal("deny_all reached a private range the operator allows")
	}
}
