package seal

import (
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func TestSealOpenRotate(t *testing.T) {
	old, cur := Generate(), Generate()
	k1, err := New(old)
	if err != nil {
		t.Fatal(err)
	}
	sealed := k1.Seal("jwt-secret-value")
	if !Sealed(sealed) || strings.Contains(sealed, "jwt-secret") {
		t.Fatalf("sealed: %q", sealed)
	}
	if again := k1.Seal("jwt-secret-value"); again == sealed {
		t.Fatal("sealing twice gave the same text: the nonce is not fresh")
	}
	if plain, stale, err := k1.Open(sealed); err != nil || stale || plain != "jwt-secret-value" {
		t.Fatalf("open: %q %v %v", plain, stale, err)
	}
	// A plain value from before sealing is returned and marked stale.
	if plain, stale, err := k1.Open("legacy"); err != nil || !stale || plain != "legacy" {
		t.Fatalf("legacy: %q %v %v", plain, stale, err)
	}
	// Rotation: the new keyring opens old values and marks them stale.
	k2, err := New(cur, old)
	if err != nil {
		t.Fatal(err)
	}
	if plain, stale, err := k2.Open(sealed); err != nil || !stale || plain != "jwt-secret-value" {
		t.Fatalf("after rotation: %q %v %v", plain, stale, err)
	}
	// Without the old key the value cannot be opened, and says why.
	k3, _ := New(cur)
	if _, _, err := k3.Open(sealed); !errors.Is(err, ErrNoKey) {
		t.Fatalf("without the old key: %v", err)
	}
	// Tampering fails authentication.
	tampered := sealed[:len(sealed)-4] + "AAA="
	if _, _, err := k1.Open(tampered); err == nil {
		t.Fatal("a tampered value opened")
	}
	// Keys in hex work too; short or garbage keys do not.
	if _, err := New(hex.EncodeToString(make([]byte, 32))); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "short", strings.Repeat("x", 44)} {
		if _, err := New(bad); err == nil {
			t.Errorf("key %q accepted", bad)
		}
	}
}
