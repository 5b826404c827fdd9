// Package initcfg reads what the host tells a guest through the kernel
// command line: hostname, DNS servers and envd's options. The network
// address itself is configured by the kernel (ip=...), before init runs.
package initcfg

import (
	"fmt"
	"net/netip"
	"strings"
)

// Config is what wrenn-init needs to know.
type Config struct {
	Hostname string
	DNS      []netip.Addr
	EnvdPort string
	// EnvdToken is envd's access token, given before envd starts so that
	// it never answers a request without it (wrenn.envd_token).
	EnvdToken string
}

// Defaults apply when the command line does not say.
const (
	DefaultHostname = "wrenn"
	DefaultEnvdPort = "49983"
)

// Parse reads wrenn.* parameters from a kernel command line:
//
//	wrenn.hostname=sb-1234 wrenn.dns=1.1.1.1,8.8.8.8 wrenn.envd_port=49983 wrenn.envd_token=<hex>
//
// Unknown parameters are ignored; malformed wrenn.* values are errors.
func Parse(cmdline string) (Config, error) {
	cfg := Config{Hostname: DefaultHostname, EnvdPort: DefaultEnvdPort}
	for _, field := range strings.Fields(cmdline) {
		key, value, ok := strings.Cut(field, "=")
		if !ok || !strings.HasPrefix(key, "wrenn.") {
			continue
		}
		switch key {
		case "wrenn.hostname":
			if !validHostname(value) {
				return cfg, fmt.Errorf("wrenn.hostname %q is not a valid host name", value)
			}
			cfg.Hostname = value
		case "wrenn.dns":
			cfg.DNS = nil
			for _, s := range strings.Split(value, ",") {
				addr, err := netip.ParseAddr(s)
				if err != nil {
					return cfg, fmt.Errorf("wrenn.dns: %w", err)
				}
				cfg.DNS = append(cfg.DNS, addr)
			}
		case "wrenn.envd_port":
			if !validPort(value) {
				return cfg, fmt.Errorf("wrenn.envd_port %q is not a port", value)
			}
			cfg.EnvdPort = value
		case "wrenn.envd_token":
			if !validToken(value) {
				return cfg, fmt.Errorf("wrenn.envd_token is not 16 to 128 hex digits")
			}
			cfg.EnvdToken = value
		}
	}
	return cfg, nil
}

func validHostname(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case r == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}

func validToken(s string) bool {
	if len(s) < 16 || len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return false
		}
	}
	return true
}

func validPort(s string) bool {
	if s == "" || len(s) > 5 {
		return false
	}
	n := 0
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
		n = n*10 + int(r-'0')
	}
	return n > 0 && n < 65536
}

// ResolvConf renders /etc/resolv.conf for the given servers.
func ResolvConf(servers []netip.Addr) string {
	var b strings.Builder
	b.WriteString("# written by wrenn-init from the kernel command line\n")
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	return b.String()
}
