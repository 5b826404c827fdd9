// Package tcpjoin joins two connections into one stream each way, as a
// TCP proxy does.
package tcpjoin

import (
	"io"
	"net"
	"sync"
)

// closeWriter is a connection that can end its sending side alone
// (*net.TCPConn, *tls.Conn).
type closeWriter interface {
	CloseWrite() error
}

// Join copies a to b and b to a until both directions end, then closes
// both. The end of one direction is passed on as a half close where the
// connection allows it, so protocols that finish their writes before
// reading the answer still work; an error in either direction closes
// both at once. Between two TCP connections the kernel splices.
func Join(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if cw, ok := dst.(closeWriter); ok && err == nil {
			_ = cw.CloseWrite()
			return
		}
		_ = dst.Close()
		_ = src.Close()
	}
	go pipe(a, b)
	go pipe(b, a)
	wg.Wait()
	_ = a.Close()
	_ = b.Close()
}
