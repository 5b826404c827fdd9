package signature

import (
	"testing"
	"time"
)

// The SDK's construction, worked by hand: sha256("/a.txt:read::tok") in
// unpadded standard base64.
func TestMakeAndCheck(t *testing.T) {
	if got := Make("/a.txt", Read, "", "tok", 0); got != "v1_EV/DvoS4mUiocl2RlxlZEymBC6EMYhkDL6kq8QBzt6g" {
		t.Fatalf("signature %q", got)
	}
	now := time.Unix(1_700_000_000, 0)
	sig := Make("/a.txt", Write, "user", "tok", now.Unix()+60)
	if err := Check(sig, "1700000060", "/a.txt", Write, "user", "tok", now); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"expired":        Check(sig, "1700000060", "/a.txt", Write, "user", "tok", now.Add(2*time.Minute)),
		"other path":     Check(sig, "1700000060", "/b.txt", Write, "user", "tok", now),
		"read for write": Check(sig, "1700000060", "/a.txt", Read, "user", "tok", now),
		"other user":     Check(sig, "1700000060", "/a.txt", Write, "root", "tok", now),
		"expiry dropped": Check(sig, "", "/a.txt", Write, "user", "tok", now),
		"expiry moved":   Check(sig, "1700009999", "/a.txt", Write, "user", "tok", now),
		"no signature":   Check("", "", "/a.txt", Write, "user", "tok", now),
		"bad expiration": Check(sig, "soon", "/a.txt", Write, "user", "tok", now),
		"another token":  Check(sig, "1700000060", "/a.txt", Write, "user", "tok2", now),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
