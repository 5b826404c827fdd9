package agentargs

import (
	"slices"
	"testing"
)

func TestArgs(t *testing.T) {
	if got := Parse("").For("/w"); !slices.Equal(got, []string{"--vmm", "qemu"}) {
		t.Errorf("no variable: %v", got)
	}
	a := Parse(" --vmm firecracker  --jailer=/usr/local/bin/jailer --diff-snapshots ")
	if a.VMM() != "firecracker" || !a.Jailed() {
		t.Errorf("vmm %q jailed %v", a.VMM(), a.Jailed())
	}
	want := []string{"--vmm", "firecracker", "--jailer=/usr/local/bin/jailer", "--diff-snapshots", "--jailer-chroot", "/w/jail"}
	if got := a.For("/w"); !slices.Equal(got, want) {
		t.Errorf("For: %v", got)
	}
	if got := Parse("--vmm=firecracker --jailer j --jailer-chroot /srv/j").For("/w"); slices.Contains(got, "/w/jail") {
		t.Errorf("an operator's jail base was overridden: %v", got)
	}
}

func TestIsVMM(t *testing.T) {
	for _, tc := range []struct {
		cmdline, root, cwd string
		want               bool
	}{
		{"/usr/bin/qemu-system-x86_64\x00-drive\x00file=/w/sandboxes/sb-1/rootfs.qcow2\x00", "/", "/", true},
		{"firecracker\x00--api-sock\x00/w/sandboxes/sb-1/run/fc.sock\x00", "/", "/", true},
		{"/firecracker\x00--id\x00sb-1\x00--start-time-us\x001\x00", "/w/jail/firecracker/sb-1/root", "/", true},
		{"/firecracker\x00--id\x00sb-1\x00", "/other/jail/firecracker/sb-1/root", "/", false},
		{"/usr/local/bin/firecracker-v1.10.1-x86_64\x00--api-sock\x00/w/sandboxes/sb-1/run/fc.sock\x00", "/", "/", true},
		{"/usr/local/bin/wrenn-agent\x00uffd-handler\x00--id\x00sb-1\x00", "/", "/w/sandboxes/sb-1/run", true},
		{"/usr/local/bin/wrenn-agent\x00uffd-handler\x00--id\x00sb-1\x00", "/", "/other/run", false},
		{"vim\x00/w/sandboxes/sb-1/sandbox.json\x00", "/", "/", false},
		{"/usr/bin/qemu-system-x86_64\x00-drive\x00file=/wx/rootfs\x00", "/", "/", false},
	} {
		if got := IsVMM([]byte(tc.cmdline), tc.root, tc.cwd, "/w"); got != tc.want {
			t.Errorf("%q in %s: %v", tc.cmdline, tc.root, got)
		}
	}
}
