// Package readlimit bounds what an HTTP client reads from a server it
// trusts less than itself (the agent reading envd in a guest, the control
// plane reading an agent). A body over its bound ends with ErrTooLarge
// after the bound instead of being read to its end: libraries that drain
// an oversized answer to report its size would otherwise read a hostile
// endless body for ever.
package readlimit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// ErrTooLarge ends a body that went past its bound.
var ErrTooLarge = errors.New("the answer is larger than the reader accepts")

// Transport wraps Next and bounds each response body it returns.
type Transport struct {
	Next http.RoundTripper
	// MaxBody bounds a whole body (unary Connect answers, JSON, errors).
	MaxBody int64
	// MaxMessage bounds each message of a Connect stream (a response
	// typed application/connect+...); such a stream may run for ever.
	MaxMessage int64
	// Stream, when set, says which requests are answered by a body of
	// any length that the caller bounds itself (a file download).
	Stream func(*http.Request) bool
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(r *http.Request) (*http.Response, error) {
	res, err := t.Next.RoundTrip(r)
	if err != nil || res.Body == nil || res.Body == http.NoBody {
		return res, err
	}
	switch {
	case strings.HasPrefix(res.Header.Get("Content-Type"), "application/connect+"):
		res.Body = &envelopes{ReadCloser: res.Body, max: t.MaxMessage}
	case t.Stream != nil && t.Stream(r) && res.StatusCode == http.StatusOK:
	default:
		res.Body = &bounded{ReadCloser: res.Body, left: t.MaxBody}
		if res.ContentLength > t.MaxBody {
			res.ContentLength = -1 // it will not all arrive
		}
	}
	return res, nil
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach Next.
func (t *Transport) CloseIdleConnections() {
	if c, ok := t.Next.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// bounded fails a body once more than left bytes arrived.
type bounded struct {
	io.ReadCloser
	left int64
}

func (b *bounded) Read(p []byte) (int, error) {
	if b.left < 0 {
		return 0, ErrTooLarge
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		// Hand over what fits; the next read fails.
		return n + int(b.left), nil
	}
	return n, err
}

// envelopes follows a Connect stream's framing (1 flag byte, a 4-byte
// big-endian size, the message) and fails the stream at the first frame
// announcing more than max bytes, before its body is read.
type envelopes struct {
	io.ReadCloser
	max    int64
	head   [5]byte
	inHead int   // bytes of the current prefix seen
	left   int64 // bytes of the current message still to come
	err    error
}

func (e *envelopes) Read(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.ReadCloser.Read(p)
	for i := 0; i < n; {
		if e.left > 0 {
			skip := min(e.left, int64(n-i))
			e.left -= skip
			i += int(skip)
			continue
		}
		e.head[e.inHead] = p[i]
		e.inHead++
		i++
		if e.inHead == len(e.head) {
			e.inHead = 0
			e.left = int64(binary.BigEndian.Uint32(e.head[1:]))
			if e.left > e.max {
				// The reader sees the prefix, then this error where the message would be.
				e.err = fmt.Errorf("%w: a stream message of %d bytes (at most %d)", ErrTooLarge, e.left, e.max)
				return i, nil
			}
		}
	}
	return n, err
}
