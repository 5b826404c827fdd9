package cli

import "testing"

func TestSizeMB(t *testing.T) {
	for in, want := range map[string]int{"5120": 5120, "10G": 10240, "10g": 10240, "512M": 512, "1TB": 1 << 20, " 2 GB ": 2048} {
		if got, err := sizeMB(in); err != nil || got != want {
			t.Errorf("%q: %d %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "G", "-1G", "1.5G", "ten", "0"} {
		if _, err := sizeMB(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
