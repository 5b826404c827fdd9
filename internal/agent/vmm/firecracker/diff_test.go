package firecracker

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestMergeDiffCopiesOnlyDirtyPages(t *testing.T) {
	dir := t.TempDir()
	const page, pages = 4096, 16
	base := filepath.Join(dir, "memory")
	if err := os.WriteFile(base, bytes.Repeat([]byte{'A'}, page*pages), 0o600); err != nil {
		t.Fatal(err)
	}
	// A sparse diff: pages 2 and 9 were dirtied; the rest are holes.
	diff := filepath.Join(dir, "memory.diff")
	f, err := os.Create(diff)
	if err != nil {
		t.Fatal(err)
	}
	_ = f.Truncate(page * pages)
	_, _ = f.WriteAt(bytes.Repeat([]byte{'B'}, page), 2*page)
	_, _ = f.WriteAt(bytes.Repeat([]byte{'C'}, page), 9*page)
	f.Close()

	if err := mergeDiff(base, diff); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(base)
	for i := range pages {
		want := byte('A')
		switch i {
		case 2:
			want = 'B'
		case 9:
			want = 'C'
		}
		if !bytes.Equal(got[i*page:(i+1)*page], bytes.Repeat([]byte{want}, page)) {
			t.Fatalf("page %d is not %q after the merge", i, want)
		}
	}
}
