// Command wrenn-agent is not implemented yet; see the project's issues.
package main

import (
	"fmt"
	"os"

	"github.com/wrenn/wrenn/internal/version"
)

func main() {
	fmt.Fprintf(os.Stderr, "wrenn-agent %s: not implemented yet\n", version.Version)
	os.Exit(2)
}
