// Package hostlock serialises tests that change the host's networking
// (namespaces, iptables, routes) across test binaries: `go test ./...`
// runs packages in parallel, and an agent under test rightly removes
// namespaces it does not own.
package hostlock

import (
	"os"
	"syscall"
	"testing"
)

const path = "/tmp/wrenn-host-tests.lock"

// Take holds the host lock until the test ends.
func Take(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("host test lock: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("host test lock: %v", err)
	}
	t.Cleanup(func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	})
}
