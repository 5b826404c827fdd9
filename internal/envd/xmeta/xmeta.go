// Package xmeta keeps a file's user metadata (what E2B's SDKs send as
// X-Metadata-* headers on an upload) in extended attributes named
// user.e2b.<key>, as E2B's envd does, so it stays with the file.
package xmeta

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"
)

const prefix = "user.e2b."

// HeaderPrefix starts the request headers that carry metadata.
const HeaderPrefix = "X-Metadata-"

// Limits on one file's metadata: ext4 keeps a file's attributes in one
// block (4 KiB).
const (
	maxKeys     = 32
	maxKeyLen   = 64
	maxValueLen = 1024
	maxTotal    = 3 << 10
)

var validKey = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// ErrInvalid is wrapped by errors about metadata that cannot be kept.
var ErrInvalid = errors.New("invalid file metadata")

// FromHeaders reads the X-Metadata-<Key> headers (keys lower-cased); nil
// when there are none.
func FromHeaders(h http.Header) (map[string]string, error) {
	var out map[string]string
	total := 0
	for name, values := range h {
		key, ok := strings.CutPrefix(http.CanonicalHeaderKey(name), HeaderPrefix)
		if !ok {
			continue
		}
		key = strings.ToLower(key)
		if !validKey.MatchString(key) || len(key) > maxKeyLen {
			return nil, fmt.Errorf("%w: key %q: use up to %d of a-z, 0-9, '.', '_' and '-'", ErrInvalid, key, maxKeyLen)
		}
		v := values[0]
		if len(v) > maxValueLen {
			return nil, fmt.Errorf("%w: the value of %q is longer than %d bytes", ErrInvalid, key, maxValueLen)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[key] = v
		total += len(key) + len(v)
	}
	if len(out) > maxKeys || total > maxTotal {
		return nil, fmt.Errorf("%w: at most %d keys and %d bytes in all", ErrInvalid, maxKeys, maxTotal)
	}
	return out, nil
}

// Set writes metadata to the file at path (not following a final
// symbolic link). A file system that keeps no user attributes answers
// an error wrapping ErrInvalid.
func Set(path string, meta map[string]string) error {
	for k, v := range meta {
		if err := unix.Lsetxattr(path, prefix+k, []byte(v), 0); err != nil {
			if errors.Is(err, unix.ENOTSUP) {
				return fmt.Errorf("%w: the file system of %s keeps no metadata", ErrInvalid, path)
			}
			return fmt.Errorf("set metadata %s on %s: %w", k, path, err)
		}
	}
	return nil
}

// Read returns path's metadata (nil when it has none, or its file system
// keeps none).
func Read(path string) map[string]string {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(path, buf)
	if errors.Is(err, unix.ERANGE) {
		if size, err2 := unix.Llistxattr(path, nil); err2 == nil && size < 1<<16 {
			buf = make([]byte, size)
			n, err = unix.Llistxattr(path, buf)
		}
	}
	if err != nil || n == 0 {
		return nil
	}
	var out map[string]string
	for _, name := range bytes.Split(buf[:n], []byte{0}) {
		key, ok := strings.CutPrefix(string(name), prefix)
		if !ok || key == "" {
			continue
		}
		val := make([]byte, maxValueLen)
		vn, err := unix.Lgetxattr(path, string(name), val)
		if err != nil {
			continue
		}
		if out == nil {
			out = map[string]string{}
		}
		out[key] = string(val[:vn])
	}
	return out
}
