// Package partfile names the temporary file an upload is written to
// before it is renamed over its target, and recognises such names, so
// that directory watchers can report an upload as a write of its target
// rather than as events for a file nobody asked for.
package partfile

import (
	"crypto/rand"
	"encoding/hex"
	"path/filepath"
	"regexp"
)

const marker = ".upload-"

// pattern matches the base name of a part file: "." + target + marker +
// 12 hex digits.
var pattern = regexp.MustCompile(`^\.(.+)\.upload-[0-9a-f]{12}$`)

// Name is a fresh part file path for target, in target's directory (so
// the final rename stays on one file system).
func Name(target string) string {
	var suffix [6]byte
	_, _ = rand.Read(suffix[:])
	return filepath.Join(filepath.Dir(target), "."+filepath.Base(target)+marker+hex.EncodeToString(suffix[:]))
}

// Target is the path a part file will be renamed to; ok is false for
// any other name.
func Target(path string) (target string, ok bool) {
	m := pattern.FindStringSubmatch(filepath.Base(path))
	if m == nil {
		return "", false
	}
	return filepath.Join(filepath.Dir(path), m[1]), true
}
