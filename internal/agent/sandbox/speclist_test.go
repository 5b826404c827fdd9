package sandbox

import (
	"strings"
	"testing"
)

func TestParsePools(t *testing.T) {
	got, err := ParsePools(" minimal:2 , base:1:2:512:2048,")
	if err != nil {
		t.Fatal(err)
	}
	want := []PoolSpec{{Template: "minimal", Size: 2}, {Template: "base", Size: 1, VCPUs: 2, MemoryMiB: 512, DiskMiB: 2048}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for in, says := range map[string]string{
		"minimal":          "want name:size",
		"minimal:x":        "not a whole number",
		"minimal:-1":       "not a whole number",
		"minimal:65":       "0 to 64",
		"../etc:1":         "",
		"minimal:1:2:64:1": "shape",
	} {
		_, err := ParsePools(in)
		if err == nil || !strings.Contains(err.Error(), says) {
			t.Errorf("ParsePools(%q): %v, want an error saying %q", in, err, says)
		}
	}
	if got, err := ParsePools(""); err != nil || len(got) != 0 {
		t.Fatalf(`ParsePools(""): %v, %v`, got, err)
	}
}

func TestParseMemoryTemplates(t *testing.T) {
	got, err := ParseMemoryTemplates("minimal:1:256:1024")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Name != "minimal" || got[0].Shape != (Shape{VCPUs: 1, MemoryMiB: 256, DiskMiB: 1024}) {
		t.Fatalf("got %+v", got)
	}
	for in, says := range map[string]string{
		"minimal:1:256":      "want name:vcpus:memory_mib:disk_mib",
		"minimal:0:256:1024": "1 to",
		"minimal:1:256:0":    "1 to",
		"minimal:1:a:1024":   "not a whole number",
	} {
		_, err := ParseMemoryTemplates(in)
		if err == nil || !strings.Contains(err.Error(), says) || !strings.HasPrefix(err.Error(), "memory template ") {
			t.Errorf("ParseMemoryTemplates(%q): %v, want an error saying %q", in, err, says)
		}
	}
}
