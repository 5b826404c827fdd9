// Package gobin builds the project's commands once per test binary, for
// tests that run them as real processes.
package gobin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var (
	mu    sync.Mutex
	dir   string
	built = map[string]error{}
)

// Path builds github.com/wrenn/wrenn/cmd/<name> (once) and returns the
// binary's path.
func Path(t testing.TB, name string) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if dir == "" {
		d, err := os.MkdirTemp("", "wrenn-test-bin")
		if err != nil {
			t.Fatal(err)
		}
		dir = d
	}
	bin := filepath.Join(dir, name)
	err, done := built[name]
	if !done {
		out, berr := exec.Command("go", "build", "-o", bin, "github.com/wrenn/wrenn/cmd/"+name).CombinedOutput()
		if berr != nil {
			err = fmt.Errorf("build %s: %v\n%s", name, berr, out)
		}
		built[name] = err
	}
	if err != nil {
		t.Fatal(err)
	}
	return bin
}
