package firecracker

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// A jailed Firecracker runs as its VM's own uid without CAP_NET_ADMIN:
// the TAP in the sandbox's namespace must be that uid's.
func TestSetTapOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	ns := "wrenn-taptest"
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	_ = exec.Command("ip", "netns", "del", ns).Run()
	run("netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	run("-n", ns, "tuntap", "add", "tap0", "mode", "tap", "user", "0")
	if err := setTapOwner(ns, "tap0", 900123, 900123); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{"owner": "900123", "group": "900123"} {
		out, err := exec.Command("ip", "netns", "exec", ns, "cat", "/sys/class/net/tap0/"+file).Output()
		if err != nil || strings.TrimSpace(string(out)) != want {
			t.Fatalf("tap0 %s: %q %v, want %s", file, out, err, want)
		}
	}
	if err := setTapOwner(ns, "nosuchtap", 1, 1); err == nil {
		t.Fatal("a missing tap was given an owner")
	}
}
