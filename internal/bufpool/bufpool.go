// Package bufpool reuses the copy buffers of proxied bodies
// (httputil.ReverseProxy's BufferPool).
package bufpool

import "sync"

// size is one buffer: what io.Copy would allocate.
const size = 32 << 10

// Pool hands out 32 KiB buffers.
type Pool struct{ p sync.Pool }

// New returns an empty pool.
func New() *Pool {
	return &Pool{p: sync.Pool{New: func() any { b := make([]byte, size); return &b }}}
}

// Get returns a buffer.
func (b *Pool) Get() []byte { return *(b.p.Get().(*[]byte)) }

// Put returns a buffer to the pool.
func (b *Pool) Put(p []byte) { b.p.Put(&p) }
