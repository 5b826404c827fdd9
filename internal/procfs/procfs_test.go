package procfs

import (
	"os"
	"testing"
)

func TestFigures(t *testing.T) {
	total, err := Mem("MemTotal")
	if err != nil || total < 64<<20 {
		t.Fatalf("MemTotal %d, %v", total, err)
	}
	avail, err := Mem("MemAvailable")
	if err != nil || avail <= 0 || avail > total {
		t.Fatalf("MemAvailable %d of %d, %v", avail, total, err)
	}
	if _, err := Mem("NoSuchField"); err == nil {
		t.Fatal("missing field found")
	}
	if rss := RSS(os.Getpid()); rss < 1<<20 {
		t.Fatalf("own RSS %d", rss)
	}
	if RSS(0) != 0 || RSS(1<<30) != 0 {
		t.Fatal("RSS of no process")
	}
}
