// Package freeport finds an unused TCP port on 127.0.0.1 for tests that
// start servers of their own.
package freeport

import (
	"net"
	"strconv"
	"testing"
)

// Get returns a port that was free a moment ago, as text.
func Get(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}
