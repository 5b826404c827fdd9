// Package safetext makes text from a less-trusted party fit to pass on:
// bounded in length, valid UTF-8, without control characters that could
// forge log lines or terminal escapes.
package safetext

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

const ellipsis = "…"

// Clip returns s as printable UTF-8 of at most max bytes: invalid bytes
// become U+FFFD, control characters spaces, and a cut ends in "…".
func Clip(s string, max int) string {
	var b strings.Builder
	for _, r := range s { // invalid bytes arrive as utf8.RuneError
		if unicode.IsControl(r) {
			r = ' '
		}
		if b.Len()+utf8.RuneLen(r) > max {
			return cut(b.String(), max-len(ellipsis)) + ellipsis
		}
		b.WriteRune(r)
	}
	return b.String()
}

// cut shortens s to at most n bytes on a rune boundary.
func cut(s string, n int) string {
	if n <= 0 {
		return ""
	}
	for len(s) > n {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}
