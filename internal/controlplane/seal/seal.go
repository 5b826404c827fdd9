// Package seal encrypts the secrets the control plane keeps in its
// database (the JWT signing secret, agents' host tokens, channel
// credentials) with a key the operator holds outside it: whoever reads
// the database, or a backup of it, learns none of them.
//
// A sealed value is "wrenc:v1:<key id>:<base64 of nonce and ciphertext>",
// AES-256-GCM under a 32-byte key; the key id (the first bytes of the
// key's SHA-256) says which key sealed it, so keys can be rotated: values
// sealed with an older key, or stored before sealing existed, are opened
// and marked for sealing again with the current key.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

const prefix = "wrenc:v1:"

// ErrNoKey means a sealed value needs a key this keyring does not hold.
var ErrNoKey = errors.New("sealed with a key this control plane does not have")

type key struct {
	id   string
	aead cipher.AEAD
}

// Keyring seals with its current key and opens with any of its keys.
type Keyring struct {
	current key
	all     map[string]key
}

// Generate makes a new key, as the operator's setting expects it.
func Generate() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

func parseKey(s string) (key, error) {
	s = strings.TrimSpace(s)
	var raw []byte
	for _, dec := range []func(string) ([]byte, error){base64.StdEncoding.DecodeString, base64.RawURLEncoding.DecodeString, hex.DecodeString} {
		if b, err := dec(s); err == nil && len(b) == 32 {
			raw = b
			break
		}
	}
	if raw == nil {
		return key{}, errors.New("a key is 32 bytes, written in base64 or hex (wrenn-cp keygen makes one)")
	}
	block, err := aes.NewCipher(raw)
	if err != nil {
		return key{}, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return key{}, err
	}
	sum := sha256.Sum256(raw)
	return key{id: hex.EncodeToString(sum[:4]), aead: aead}, nil
}

// New builds a keyring from the current key and older ones still needed
// to open values sealed before a rotation.
func New(current string, older ...string) (*Keyring, error) {
	cur, err := parseKey(current)
	if err != nil {
		return nil, fmt.Errorf("encryption key: %w", err)
	}
	k := &Keyring{current: cur, all: map[string]key{cur.id: cur}}
	for i, o := range older {
		if strings.TrimSpace(o) == "" {
			continue
		}
		ok, err := parseKey(o)
		if err != nil {
			return nil, fmt.Errorf("old encryption key %d: %w", i+1, err)
		}
		k.all[ok.id] = ok
	}
	return k, nil
}

// Seal encrypts a value with the current key.
func (k *Keyring) Seal(plain string) string {
	nonce := make([]byte, k.current.aead.NonceSize())
	_, _ = rand.Read(nonce)
	box := k.current.aead.Seal(nonce, nonce, []byte(plain), []byte(k.current.id))
	return prefix + k.current.id + ":" + base64.StdEncoding.EncodeToString(box)
}

// Sealed reports whether s is a sealed value.
func Sealed(s string) bool { return strings.HasPrefix(s, prefix) }

// Open decrypts a sealed value. A value that is not sealed (stored before
// sealing existed) comes back as it is. stale says the value should be
// sealed again with the current key.
func (k *Keyring) Open(s string) (plain string, stale bool, err error) {
	rest, ok := strings.CutPrefix(s, prefix)
	if !ok {
		return s, true, nil
	}
	id, b64, ok := strings.Cut(rest, ":")
	if !ok {
		return "", false, errors.New("a sealed value without its key id")
	}
	kk, ok := k.all[id]
	if !ok {
		return "", false, fmt.Errorf("%w (key %s)", ErrNoKey, id)
	}
	box, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(box) < kk.aead.NonceSize() {
		return "", false, errors.New("a sealed value that is not base64 of nonce and ciphertext")
	}
	out, err := kk.aead.Open(nil, box[:kk.aead.NonceSize()], box[kk.aead.NonceSize():], []byte(id))
	if err != nil {
		return "", false, fmt.Errorf("a sealed value failed authentication (key %s): %w", id, err)
	}
	return string(out), id != k.current.id, nil
}
