package network

import "testing"

func TestParseSlotRange(t *testing.T) {
	r, err := ParseSlotRange("1001-2000")
	if err != nil || r != (SlotRange{1001, 2000}) || !r.Contains(1001) || !r.Contains(2000) || r.Contains(1000) || r.Contains(2001) {
		t.Fatalf("%+v %v", r, err)
	}
	for _, bad := range []string{"", "5", "0-10", "10-5", "1-40000", "a-b", "1-2-3"} {
		if _, err := ParseSlotRange(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
