package envconf

import (
	"strings"
	"testing"
	"time"
)

func TestSettings(t *testing.T) {
	t.Setenv("WRENN_T_STR", "x")
	t.Setenv("WRENN_T_EMPTY", "")
	if String("WRENN_T_STR", "d") != "x" || String("WRENN_T_EMPTY", "d") != "d" || String("WRENN_T_UNSET", "d") != "d" {
		t.Fatal("String")
	}
	t.Setenv("WRENN_T_INT", "42")
	if n, err := Int("WRENN_T_INT", 1); n != 42 || err != nil {
		t.Fatalf("Int: %d %v", n, err)
	}
	if n, err := Int("WRENN_T_UNSET", 7); n != 7 || err != nil {
		t.Fatalf("Int default: %d %v", n, err)
	}
	t.Setenv("WRENN_T_BAD", "lots")
	if _, err := Int("WRENN_T_BAD", 1); err == nil || !strings.Contains(err.Error(), "WRENN_T_BAD") {
		t.Fatalf("a bad number must name the variable: %v", err)
	}
	t.Setenv("WRENN_T_DUR", "90s")
	if d, err := Duration("WRENN_T_DUR", time.Second); d != 90*time.Second || err != nil {
		t.Fatalf("Duration: %v %v", d, err)
	}
	if _, err := Duration("WRENN_T_BAD", time.Second); err == nil {
		t.Fatal("bad duration accepted")
	}
	t.Setenv("WRENN_T_BOOL", "true")
	if b, err := Bool("WRENN_T_BOOL", false); !b || err != nil {
		t.Fatalf("Bool: %v %v", b, err)
	}
	if _, err := Bool("WRENN_T_BAD", false); err == nil {
		t.Fatal("bad bool accepted")
	}
}
