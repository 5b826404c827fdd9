package procfs

import (
	"os"
	"strconv"
	"testing"
	"time"
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
	if pid, err := Status(os.Getpid(), "Pid"); err != nil || pid != strconv.Itoa(os.Getpid()) {
		t.Fatalf("own Pid field %q, %v", pid, err)
	}
	if _, err := Status(os.Getpid(), "NoSuchField"); err == nil {
		t.Fatal("missing status field found")
	}
	if rss := RSS(os.Getpid()); rss < 1<<20 {
		t.Fatalf("own RSS %d", rss)
	}
	// CPU time grows while the process computes.
	before, deadline := CPUTicks(os.Getpid()), time.Now().Add(5*time.Second)
	for CPUTicks(os.Getpid()) <= before {
		if time.Now().After(deadline) {
			t.Fatalf("CPU time stayed at %d ticks while busy", before)
		}
	}
	if CPUTicks(1<<30) != 0 {
		t.Fatal("CPU time of no process")
	}
	if RSS(0) != 0 || RSS(1<<30) != 0 {
		t.Fatal("RSS of no process")
	}
}
