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
	return build(t, name, "github.com/wrenn/wrenn/cmd/"+name, false)
}

// Static builds the project's package pkg (a path such as
// "internal/testutil/hostileenvd") as a static binary that runs inside
// any guest, once, and returns its path.
func Static(t testing.TB, pkg string) string {
	t.Helper()
	return build(t, filepath.Base(pkg)+"-static", "github.com/wrenn/wrenn/"+pkg, true)
}

func build(t testing.TB, name, pkg string, static bool) string {
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
		args := []string{"build", "-o", bin}
		if !static && os.Getenv("WRENN_TEST_RACE") == "1" {
			// The project's commands under the race detector; with GORACE
			// halt_on_error=1 a race ends the process (exit 66).
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, pkg)...)
		if static {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		out, berr := cmd.CombinedOutput()
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
