package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func logSizes(t *testing.T, dir string) (cur, old int64) {
	t.Helper()
	if fi, err := os.Stat(LogPath(dir)); err == nil {
		cur = fi.Size()
	}
	if fi, err := os.Stat(LogPath(dir) + ".1"); err == nil {
		old = fi.Size()
	}
	return cur, old
}

func wait(t *testing.T, done <-chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the console reader did not end when its writer closed")
	}
}

// A VMM whose guest writes gigabytes to its console (a Firecracker
// guest's serial is unthrottled) leaves at most two files of MaxBytes;
// the log ends with the latest lines and records the drop.
func TestConsoleLogIsCapped(t *testing.T) {
	dir := t.TempDir()
	c := ConsoleLog{MaxBytes: 64 << 10, BytesPerSecond: 16 << 10}
	w, done, err := c.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("console flood line\n"), 64<<10/19)
	var wrote int64
	start := time.Now()
	for wrote < 2<<30 {
		n, err := w.Write(chunk)
		if err != nil {
			t.Fatal(err)
		}
		wrote += int64(n)
	}
	t.Logf("wrote %d MiB to the console in %v", wrote>>20, time.Since(start).Round(time.Millisecond))
	_, _ = fmt.Fprintf(w, "the last line\n")
	time.Sleep(time.Second) // the bucket refills: the last line is kept
	_, _ = fmt.Fprintf(w, "after the pause\n")
	w.Close()
	wait(t, done)
	cur, old := logSizes(t, dir)
	if cur > c.MaxBytes || old > c.MaxBytes || cur+old == 0 {
		t.Fatalf("wrote %d bytes; the log holds %d + %d (max %d each)", wrote, cur, old, c.MaxBytes)
	}
	tail := LogTail(LogPath(dir), 3)
	if !strings.Contains(tail, "after the pause") || !strings.Contains(tail, "bytes of console output dropped") {
		t.Fatalf("tail: %q", tail)
	}
	if fi, _ := os.Stat(LogPath(dir)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("the log is readable by others: %v", fi.Mode())
	}
}

// Output within the rate is kept whole, across rotations, and an adopted
// VMM's console is followed again after the reader went away.
func TestConsoleLogKeepsWhatFitsAndFollows(t *testing.T) {
	dir := t.TempDir()
	c := ConsoleLog{MaxBytes: 4 << 10, BytesPerSecond: 1 << 20}
	w, done, err := c.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		fmt.Fprintf(w, "line %03d\n", i)
	}
	// A second writer, like a VMM holding its own copy, keeps the FIFO open.
	vmm, err := os.OpenFile(ConsolePath(dir), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	fmt.Fprintf(vmm, "still writing\n")
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(LogTail(LogPath(dir), 1), "still writing") {
		if time.Now().After(deadline) {
			t.Fatalf("tail: %q", LogTail(LogPath(dir), 5))
		}
		time.Sleep(10 * time.Millisecond)
	}
	vmm.Close()
	wait(t, done)
	if got := LogTail(LogPath(dir), 2); got != "line 099 | still writing" {
		t.Fatalf("tail: %q", got)
	}

	// An agent that dies leaves a VMM writing to a FIFO nobody reads:
	// its writes fail (EPIPE) and it goes on; a restarted agent follows.
	reader, err := os.OpenFile(ConsolePath(dir), os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	vmm, err = os.OpenFile(ConsolePath(dir), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	reader.Close() // the agent died
	if _, err := fmt.Fprintf(vmm, "lost while no agent reads\n"); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("a write with no reader: %v", err)
	}
	follow, err := c.Follow(dir)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(vmm, "after the restart\n")
	vmm.Close()
	wait(t, follow)
	if got := LogTail(LogPath(dir), 1); got != "after the restart" {
		t.Fatalf("tail after following: %q", got)
	}
	if cur, old := logSizes(t, dir); cur > c.MaxBytes || old > c.MaxBytes {
		t.Fatalf("sizes %d %d over %d", cur, old, c.MaxBytes)
	}
}

func TestLogTailReadsOnlyTheEnd(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, LogFile)
	big := bytes.Repeat([]byte("old line\n"), 1<<20) // 9 MiB
	if err := os.WriteFile(path+".1", []byte("from the older file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(big, []byte("the end\n")...), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := LogTail(path, 2); got != "old line | the end" {
		t.Fatalf("tail: %q", got)
	}
	if err := os.WriteFile(path, []byte("only line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := LogTail(path, 2); got != "from the older file | only line" {
		t.Fatalf("tail across files: %q", got)
	}
}
