package safetext

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestClip(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                "plain",
		"line\nforged\x1b[31m": "line forged [31m",
		"bad \xff byte":        "bad \uFFFD byte",
		"":                     "",
	} {
		if got := Clip(in, 100); got != want {
			t.Errorf("Clip(%q) = %q, want %q", in, got, want)
		}
	}
	long := strings.Repeat("é", 1000)
	got := Clip(long, 101)
	if len(got) > 101 || !utf8.ValidString(got) || !strings.HasSuffix(got, "…") {
		t.Errorf("long text: %d bytes, valid %v: %q", len(got), utf8.ValidString(got), got)
	}
	if got := Clip(strings.Repeat("a", 10), 10); got != strings.Repeat("a", 10) {
		t.Errorf("exact fit was cut: %q", got)
	}
}
