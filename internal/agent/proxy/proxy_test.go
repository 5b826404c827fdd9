package proxy

import "testing"

func TestParseHost(t *testing.T) {
	for host, want := range map[string]struct {
		port int
		id   string
	}{
		"8080-sb-1a2b.wrenn.example:5007": {8080, "sb-1a2b"},
		"3000-sb-x.localhost":             {3000, "sb-x"},
		"80-SB-Upper.example.com":         {80, "sb-upper"},
	} {
		port, id, err := ParseHost(host)
		if err != nil || port != want.port || id != want.id {
			t.Errorf("%s: %d %q %v", host, port, id, err)
		}
	}
	for _, bad := range []string{"", "example.com", "sb-1.example.com", "0-sb-1.x", "70000-sb-1.x", "80-.x", "x80-sb.x"} {
		if _, _, err := ParseHost(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
