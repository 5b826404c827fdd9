package readlimit

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"
)

func frame(size uint32, body []byte) []byte {
	head := make([]byte, 5)
	binary.BigEndian.PutUint32(head[1:], size)
	return append(head, body...)
}

func TestBoundedBody(t *testing.T) {
	for _, size := range []int{0, 99, 100} {
		b := &bounded{ReadCloser: io.NopCloser(bytes.NewReader(make([]byte, size))), left: 100}
		data, err := io.ReadAll(iotest.OneByteReader(b))
		if err != nil || len(data) != size {
			t.Errorf("%d bytes under a bound of 100: read %d, %v", size, len(data), err)
		}
	}
	b := &bounded{ReadCloser: io.NopCloser(strings.NewReader(strings.Repeat("x", 1000))), left: 100}
	data, err := io.ReadAll(b)
	if !errors.Is(err, ErrTooLarge) || len(data) != 100 {
		t.Errorf("1000 bytes under a bound of 100: read %d, %v", len(data), err)
	}
}

func TestEnvelopes(t *testing.T) {
	good := append(frame(3, []byte("abc")), frame(0, nil)...)
	good = append(good, frame(5, []byte("hello"))...)
	for name, r := range map[string]io.Reader{"whole": bytes.NewReader(good), "byte by byte": iotest.OneByteReader(bytes.NewReader(good))} {
		e := &envelopes{ReadCloser: io.NopCloser(r), max: 5}
		data, err := io.ReadAll(e)
		if err != nil || !bytes.Equal(data, good) {
			t.Errorf("%s: frames within the bound: %q %v", name, data, err)
		}
	}
	bad := append(frame(3, []byte("abc")), frame(6, []byte("toobig"))...)
	e := &envelopes{ReadCloser: io.NopCloser(bytes.NewReader(bad)), max: 5}
	data, err := io.ReadAll(e)
	if !errors.Is(err, ErrTooLarge) || len(data) != 8+5 {
		t.Errorf("a frame over the bound: read %d bytes, %v", len(data), err)
	}
}

func TestTransport(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/stream":
			w.Header().Set("Content-Type", "application/connect+proto")
			_, _ = w.Write(frame(1000, make([]byte, 1000)))
		default:
			_, _ = w.Write(make([]byte, 1000))
		}
	}))
	defer srv.Close()
	c := &http.Client{Transport: &Transport{Next: http.DefaultTransport, MaxBody: 100, MaxMessage: 100,
		Stream: func(r *http.Request) bool { return r.URL.Path == "/download" }}}
	for path, wantErr := range map[string]bool{"/unary": true, "/stream": true, "/download": false} {
		res, err := c.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.ReadAll(res.Body)
		res.Body.Close()
		if errors.Is(err, ErrTooLarge) != wantErr {
			t.Errorf("%s: %v", path, err)
		}
	}
}
