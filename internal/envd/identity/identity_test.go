package identity

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestResolvePath(t *testing.T) {
	u := &User{Name: "user", Home: "/home/user"}
	for in, want := range map[string]string{
		"~":               "/home/user",
		"~/a/b":           "/home/user/a/b",
		"notes.txt":       "/home/user/notes.txt",
		"./x/../y":        "/home/user/y",
		"/etc//passwd":    "/etc/passwd",
		"/a/b/../../..":   "/",
		"../../etc/x":     "/etc/x",
		"~other":          "/home/user/~other", // only ~ and ~/ expand
		"/tmp/with space": "/tmp/with space",
	} {
		got, err := ResolvePath(u, in)
		if err != nil || got != want {
			t.Errorf("ResolvePath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "a\x00b"} {
		if _, err := ResolvePath(u, bad); err == nil {
			t.Errorf("ResolvePath(%q) succeeded", bad)
		}
	}
}

// FuzzResolvePath checks that whatever a client sends, the result is a
// clean absolute path or an error.
func FuzzResolvePath(f *testing.F) {
	for _, s := range []string{"~", "~/x", "a/../../b", "/", "..", "\x00", "~/../.."} {
		f.Add(s)
	}
	u := &User{Name: "user", Home: "/home/user"}
	f.Fuzz(func(t *testing.T, in string) {
		got, err := ResolvePath(u, in)
		if err != nil {
			return
		}
		if !filepath.IsAbs(got) || filepath.Clean(got) != got || strings.ContainsRune(got, 0) {
			t.Fatalf("ResolvePath(%q) = %q", in, got)
		}
	})
}

func TestLookup(t *testing.T) {
	root, err := Lookup("root")
	if err != nil || root.UID != 0 || root.Home != "/root" || len(root.Groups) == 0 {
		t.Fatalf("root: %+v, %v", root, err)
	}
	if _, err := Lookup("no-such-user-wrenn"); err == nil || !strings.Contains(err.Error(), "unknown user") {
		t.Fatalf("unknown user: %v", err)
	}
}

// TestActorRestoresAfterPanic makes sure a panic inside Do cannot leave the
// goroutine running with another user's file-system identity.
func TestActorRestoresAfterPanic(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch file-system credentials")
	}
	nobody, err := Lookup("nobody")
	if err != nil {
		t.Fatal(err)
	}
	actor, err := NewActor(nobody)
	if err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "secret")
	_ = os.WriteFile(secret, []byte("x"), 0o600)

	done := make(chan error, 1)
	go func() {
		defer func() { _ = recover() }()
		defer func() {
			// Same goroutine, after the panic: it must be root again.
			_, err := os.ReadFile(secret)
			done <- err
		}()
		_ = actor.Do(func() error {
			if _, err := os.ReadFile(secret); err == nil {
				t.Error("nobody could read a root-only file")
			}
			panic("boom")
		})
	}()
	if err := <-done; err != nil {
		t.Fatalf("after a panic in Do the goroutine still acts as nobody: %v", err)
	}
}
