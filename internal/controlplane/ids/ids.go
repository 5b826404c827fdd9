// Package ids makes the opaque identifiers clients see: a kind prefix and
// 80 random bits, so IDs never collide at any realistic scale.
package ids

import (
	"crypto/rand"
	"encoding/base32"
	"strings"
)

var encoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// New returns "<kind>-" and 16 random base32 characters (80 bits).
func New(kind string) string {
	return kind + "-" + Random(10)
}

// Random returns n random bytes as lower-case base32 text.
func Random(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on Linux
	return encoding.EncodeToString(b)
}

// Valid reports whether s looks like an ID of kind, so that obviously
// malformed path parameters are answered without a database round trip.
func Valid(kind, s string) bool {
	rest, ok := strings.CutPrefix(s, kind+"-")
	if !ok || len(rest) == 0 || len(rest) > 64 {
		return false
	}
	for _, c := range rest {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}
