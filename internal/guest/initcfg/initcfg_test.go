package initcfg

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	cfg, err := Parse("console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off wrenn.hostname=sb-abc wrenn.dns=1.1.1.1,2606:4700::1111 wrenn.envd_port=50000 quiet")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Hostname != "sb-abc" || cfg.EnvdPort != "50000" || len(cfg.DNS) != 2 || cfg.DNS[1] != netip.MustParseAddr("2606:4700::1111") {
		t.Fatalf("%+v", cfg)
	}
	def, err := Parse("console=ttyS0")
	if err != nil || def.Hostname != DefaultHostname || def.EnvdPort != DefaultEnvdPort || def.DNS != nil {
		t.Fatalf("defaults: %+v %v", def, err)
	}
	for _, bad := range []string{"wrenn.hostname=-x", "wrenn.hostname=a_b", "wrenn.dns=nope", "wrenn.envd_port=0", "wrenn.envd_port=70000", "wrenn.envd_port=1x"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
	if got := ResolvConf(cfg.DNS); !strings.Contains(got, "nameserver 1.1.1.1\nnameserver 2606:4700::1111\n") {
		t.Fatalf("resolv.conf:\n%s", got)
	}
}
