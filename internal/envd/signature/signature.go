// Package signature checks the signed /files URLs E2B's SDKs make
// (uploadUrl, downloadUrl): a URL carries "v1_" and the unpadded
// standard base64 of SHA-256 over "path:operation:user:token" (and
// ":expiration" when it expires), so it works without the access token
// in a header.
package signature

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"
	"time"
)

// Operations a signature may allow.
const (
	Read  = "read"
	Write = "write"
)

// Make returns the signature for path, operation and user under token;
// expiration is unix seconds, or 0 for none.
func Make(path, operation, user, token string, expiration int64) string {
	parts := []string{path, operation, user, token}
	if expiration != 0 {
		parts = append(parts, strconv.FormatInt(expiration, 10))
	}
	sum := sha256.Sum256([]byte(strings.Join(parts, ":")))
	return "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
}

// Check verifies a presented signature and its expiration (the
// signature_expiration parameter, "" for none) at now.
func Check(sig, expiration, path, operation, user, token string, now time.Time) error {
	if sig == "" {
		return errors.New("missing signature query parameter (or the X-Access-Token header)")
	}
	var exp int64
	if expiration != "" {
		var err error
		if exp, err = strconv.ParseInt(expiration, 10, 64); err != nil || exp <= 0 {
			return errors.New("signature_expiration must be unix seconds")
		}
	}
	want := Make(path, operation, user, token, exp)
	if subtle.ConstantTimeCompare([]byte(sig), []byte(want)) != 1 {
		return errors.New("invalid signature")
	}
	if exp != 0 && exp < now.Unix() {
		return errors.New("signature is already expired") // E2B envd's words: its SDK tests compare them
	}
	return nil
}
