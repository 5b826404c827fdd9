// Package auth holds the control plane's credentials: password hashes,
// API keys, one-time tokens and signed JWTs for users and hosts.
package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// MinPasswordLength is the shortest password accepted at signup or change.
const MinPasswordLength = 8

// ErrWrongPassword means the password does not match the stored hash.
var ErrWrongPassword = errors.New("wrong password")

// HashPassword returns a bcrypt hash of password.
func HashPassword(password string) (string, error) {
	if len(password) > 72 {
		// bcrypt ignores bytes past 72; refuse rather than silently truncate.
		return "", errors.New("password longer than 72 bytes")
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return "", fmt.Errorf("hash password: %w", err)
	}
	return string(h), nil
}

// CheckPassword compares in constant time (bcrypt does).
func CheckPassword(hash, password string) error {
	if err := bcrypt.CompareHashAndPassword([]byte(hash), []byte(password)); err != nil {
		return ErrWrongPassword
	}
	return nil
}

// dummyHash lets a login for an unknown email cost the same as a real
// one, so response times do not reveal which emails have accounts.
var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("wrenn-dummy-password"), bcrypt.DefaultCost)

// BurnPasswordCheck spends the time of one password check.
func BurnPasswordCheck(password string) {
	_ = bcrypt.CompareHashAndPassword(dummyHash, []byte(password))
}

const keyAlphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

// APIKeyPrefix starts every API key.
const APIKeyPrefix = "wrn_"

// NewAPIKey returns a key ("wrn_" + 32 random characters), its display
// prefix, and the hash that is the only thing stored.
func NewAPIKey() (key, display, hash string) {
	key = APIKeyPrefix + RandomString(32)
	return key, key[:len(APIKeyPrefix)+8] + "...", HashToken(key)
}

// E2BKeyPrefix starts API keys made in E2B's format ("e2b_" + 40 lower
// hex digits), which E2B's SDKs check for before they send a request.
const E2BKeyPrefix = "e2b_"

// NewE2BAPIKey is NewAPIKey in E2B's format (160 random bits).
func NewE2BAPIKey() (key, display, hash string) {
	b := make([]byte, 20)
	_, _ = rand.Read(b)
	key = E2BKeyPrefix + hex.EncodeToString(b)
	return key, key[:len(E2BKeyPrefix)+8] + "...", HashToken(key)
}

// WellFormedAPIKey says whether key has the shape of a key this control
// plane issues (either format), so malformed ones cost no lookup.
func WellFormedAPIKey(key string) bool {
	if rest, ok := strings.CutPrefix(key, APIKeyPrefix); ok {
		return len(rest) == 32
	}
	if rest, ok := strings.CutPrefix(key, E2BKeyPrefix); ok && len(rest) == 40 {
		_, err := hex.DecodeString(rest)
		return err == nil && strings.ToLower(rest) == rest
	}
	return false
}

// RandomString returns n characters drawn uniformly from [A-Za-z0-9].
func RandomString(n int) string {
	b := make([]byte, n)
	max := big.NewInt(int64(len(keyAlphabet)))
	for i := range b {
		v, _ := rand.Int(rand.Reader, max)
		b[i] = keyAlphabet[v.Int64()]
	}
	return string(b)
}

// HashToken is how API keys and one-time tokens are stored: they carry
// enough entropy that a plain SHA-256 is not guessable.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}
