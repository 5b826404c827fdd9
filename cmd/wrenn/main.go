// Command wrenn is Wrenn's command-line client; `wrenn --help` lists
// what it does.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/wrenn/wrenn/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
