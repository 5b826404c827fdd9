package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/term"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// shell connects the local terminal to a terminal session in a capsule:
// raw keystrokes in, terminal output out, window size changes passed on.
// The exit code is the remote program's.
func (a *app) shell(ctx context.Context, c *wrenn.Client, id, command, join string) error {
	in, _ := a.stdin.(*os.File)
	out, _ := a.stdout.(*os.File)
	interactive := in != nil && out != nil && term.IsTerminal(int(in.Fd())) && term.IsTerminal(int(out.Fd()))
	cols, rows := 80, 24
	if interactive {
		if w, h, err := term.GetSize(int(out.Fd())); err == nil {
			cols, rows = w, h
		}
	}
	var (
		t   *wrenn.Terminal
		err error
	)
	if join != "" {
		t, err = c.JoinTerminal(ctx, id, join)
	} else {
		t, err = c.OpenTerminal(ctx, id, wrenn.TerminalParams{Cmd: command, Cols: cols, Rows: rows})
	}
	if err != nil {
		return err
	}
	defer t.Close()
	fmt.Fprintf(a.stderr, "[session %s: leave it running with Ctrl-] and rejoin with `wrenn shell %s --join %s`]\r\n", t.Tag(), id, t.Tag())
	if interactive {
		old, err := term.MakeRaw(int(in.Fd()))
		if err != nil {
			return fmt.Errorf("raw terminal: %w", err)
		}
		defer func() { _ = term.Restore(int(in.Fd()), old) }()
		if join != "" {
			_ = t.Resize(cols, rows)
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if w, h, err := term.GetSize(int(out.Fd())); err == nil {
					_ = t.Resize(w, h)
				}
			}
		}()
	}
	detached := make(chan struct{})
	go a.pumpKeys(t, interactive, detached)
	events := make(chan wrenn.TerminalEvent)
	errs := make(chan error, 1)
	go func() {
		for {
			ev, err := t.Next()
			if err != nil {
				errs <- err
				return
			}
			events <- ev
		}
	}()
	for {
		select {
		case <-detached:
			fmt.Fprintf(a.stderr, "\r\n[left session %s running]\r\n", t.Tag())
			return nil
		case err := <-errs:
			return err
		case ev := <-events:
			switch ev.Type {
			case "output":
				_, _ = a.stdout.Write(ev.Output)
			case "exit":
				if ev.ExitCode != 0 {
					return ExitError{Code: ev.ExitCode}
				}
				return nil
			case "error":
				return fmt.Errorf("terminal: %s", ev.Error)
			}
		}
	}
}

// pumpKeys copies local input to the terminal. Ctrl-] detaches; at the
// end of piped input it sends Ctrl-D, as a user closing the shell would.
func (a *app) pumpKeys(t *wrenn.Terminal, interactive bool, detached chan<- struct{}) {
	buf := make([]byte, 4096)
	for {
		n, err := a.stdin.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			if interactive {
				for i, b := range chunk {
					if b == 0x1d { // Ctrl-]
						_, _ = t.Write(chunk[:i])
						close(detached)
						return
					}
				}
			}
			if _, werr := t.Write(chunk); werr != nil {
				return
			}
		}
		if err == io.EOF && !interactive {
			_, _ = t.Write([]byte{0x04})
			return
		}
		if err != nil {
			return
		}
	}
}
