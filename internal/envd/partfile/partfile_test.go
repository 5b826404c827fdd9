package partfile

import (
	"path/filepath"
	"testing"
)

func TestNameAndTarget(t *testing.T) {
	for _, target := range []string{"/home/user/a.txt", "/tmp/.hidden", "/x/y.upload-z", "/dir/with space"} {
		p := Name(target)
		if filepath.Dir(p) != filepath.Dir(target) {
			t.Fatalf("part file %s is not beside %s", p, target)
		}
		got, ok := Target(p)
		if !ok || got != target {
			t.Fatalf("Target(%q) = %q, %v; want %q", p, got, ok, target)
		}
		if Name(target) == p {
			t.Fatalf("two part files for %s share a name", target)
		}
	}
	for _, other := range []string{"/a/b.txt", "/a/.b.upload-", "/a/.b.upload-12345678901z", "/a/b.upload-0123456789ab", "/a/..upload-0123456789ab"} {
		if got, ok := Target(other); ok {
			t.Fatalf("Target(%q) = %q; it is not a part file", other, got)
		}
	}
}
