package loopdev

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
)

func requireLoops(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	if err := Available(); err != nil {
		t.Skip(err)
	}
}

func sparse(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAttachFindDetach(t *testing.T) {
	requireLoops(t)
	dir := t.TempDir()
	file := sparse(t, dir, "disk", 8<<20)
	ro, err := Attach(file, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Detach(ro) })
	rw, err := Attach(file, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Detach(rw) })
	if !ReadOnly(ro) || ReadOnly(rw) {
		t.Errorf("read-only: %s %v, %s %v", ro, ReadOnly(ro), rw, ReadOnly(rw))
	}
	// The read-only device refuses writes.
	if f, err := os.OpenFile(ro, os.O_WRONLY, 0); err == nil {
		_, werr := f.Write(make([]byte, 4096))
		f.Close()
		if werr == nil {
			t.Error("the read-only loop device took a write")
		}
	}
	devs, err := Find(file)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(devs)
	want := []string{ro, rw}
	slices.Sort(want)
	if !slices.Equal(devs, want) {
		t.Errorf("Find: %v, want %v", devs, want)
	}
	// Found by inode: another file of the same name elsewhere is not it,
	// and a renamed file still is.
	moved := filepath.Join(dir, "moved")
	if err := os.Rename(file, moved); err != nil {
		t.Fatal(err)
	}
	sparse(t, dir, "disk", 8<<20)
	if got, _ := Find(file); len(got) != 0 {
		t.Errorf("a new file at the old path is on %v", got)
	}
	if got, _ := Find(moved); len(got) != 2 {
		t.Errorf("the renamed file is on %v", got)
	}
	if n, err := Holders(ro); err != nil || n != 0 {
		t.Errorf("holders: %d, %v", n, err)
	}
	for _, d := range []string{ro, rw} {
		if err := Detach(d); err != nil {
			t.Fatal(err)
		}
		if err := Detach(d); err != nil {
			t.Errorf("detaching a free device: %v", err)
		}
	}
	if got, _ := Find(moved); len(got) != 0 {
		t.Errorf("still on %v after detach", got)
	}
}

// Attaches at once get different devices (the kernel's EBUSY for a device
// taken between "which is free" and "use it" is retried).
func TestConcurrentAttaches(t *testing.T) {
	requireLoops(t)
	dir := t.TempDir()
	const n = 6
	devs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		file := sparse(t, dir, "f"+strconv.Itoa(i), 1<<20)
		wg.Add(1)
		go func() {
			defer wg.Done()
			devs[i], errs[i] = Attach(file, i%2 == 0)
		}()
	}
	wg.Wait()
	for i := range n {
		if devs[i] != "" {
			t.Cleanup(func() { _ = Detach(devs[i]) })
		}
	}
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if seen[devs[i]] {
			t.Errorf("%s given twice", devs[i])
		}
		seen[devs[i]] = true
		got, _ := Find(filepath.Join(dir, "f"+strconv.Itoa(i)))
		if !slices.Equal(got, []string{devs[i]}) {
			t.Errorf("file %d: on %v, attached to %s", i, got, devs[i])
		}
	}
}
