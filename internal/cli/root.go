// Package cli is the `wrenn` command: capsules, commands, terminals,
// files, templates, hosts and keys from a terminal, through the Go SDK.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/wrenn/wrenn/internal/version"
	"github.com/wrenn/wrenn/pkg/wrenn"
)

// ExitError carries a command's exit code (wrenn exec) without printing
// anything more.
type ExitError struct{ Code int }

func (e ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// app holds what every command shares.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	json           bool
	url, apiKey    string
}

// Run executes the CLI with args and returns the process exit code.
func Run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	root := a.root()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	var exit ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exit):
		return exit.Code
	default:
		fmt.Fprintln(stderr, "wrenn:", describe(err))
		return 1
	}
}

// describe turns API errors into one plain sentence with a hint, and
// drops the SDK's own "wrenn: " prefixes (Run prints one).
func describe(err error) string {
	var ae *wrenn.APIError
	if !errors.As(err, &ae) {
		msg := err.Error()
		for strings.HasPrefix(msg, "wrenn: ") {
			msg = strings.TrimPrefix(msg, "wrenn: ")
		}
		return msg
	}
	msg := ae.Message
	switch ae.Status {
	case 401:
		msg += " (run `wrenn login`, or set WRENN_API_KEY)"
	case 429:
		if ae.RetryAfter > 0 {
			msg += fmt.Sprintf(" (retry in %s)", ae.RetryAfter)
		}
	}
	return msg
}

func (a *app) root() *cobra.Command {
	root := &cobra.Command{
		Use:           "wrenn",
		Short:         "Run code in Wrenn capsules (microVM sandboxes)",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		Long: `wrenn talks to a Wrenn control plane. Configure it once with ` + "`wrenn login`" + `,
or with WRENN_URL and WRENN_API_KEY. Output is a table; --json prints JSON for scripts.`,
	}
	root.PersistentFlags().BoolVar(&a.json, "json", false, "print JSON instead of tables")
	root.PersistentFlags().StringVar(&a.url, "url", "", "control plane URL (default: the saved one, WRENN_URL, or "+DefaultURL+")")
	root.PersistentFlags().StringVar(&a.apiKey, "api-key", "", "API key (default: the saved one or WRENN_API_KEY)")
	root.AddCommand(a.loginCmd(), a.sandboxCmd(), a.execCmd(), a.shellCmd(), a.filesCmd(), a.templateCmd(),
		a.snapshotCmd(), a.hostCmd(), a.keyCmd())
	refuseUnknown(root)
	return root
}

// refuseUnknown makes every command group (sandbox, files, ...) fail on
// an unknown subcommand, with cobra's suggestions, instead of printing
// its help and succeeding.
func refuseUnknown(cmd *cobra.Command) {
	for _, sub := range cmd.Commands() {
		refuseUnknown(sub)
	}
	if !cmd.HasSubCommands() || cmd.Runnable() || !cmd.HasParent() {
		return
	}
	cmd.Args = cobra.ArbitraryArgs
	cmd.SuggestionsMinimumDistance = 2
	cmd.RunE = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return c.Help()
		}
		msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
		if s := c.SuggestionsFor(args[0]); len(s) > 0 {
			msg += "; did you mean " + strings.Join(s, " or ") + "?"
		}
		return errors.New(msg + " (see " + c.CommandPath() + " --help)")
	}
}

// client builds an SDK client from flags, environment and saved config.
// needToken asks for the user token the host and key routes need.
func (a *app) client(needToken bool) (*wrenn.Client, error) {
	cfg, err := loadConfig()
	if err != nil {
		return nil, err
	}
	if a.url != "" {
		cfg.URL = a.url
	}
	if a.apiKey != "" {
		cfg.APIKey = a.apiKey
	}
	var opts []wrenn.Option
	if needToken {
		if cfg.Token == "" || time.Now().After(cfg.TokenExpires) {
			return nil, errors.New("this needs a signed-in user: run `wrenn login --email EMAIL` (the saved sign-in lasts 6 hours)")
		}
		opts = append(opts, wrenn.WithToken(cfg.Token))
	} else {
		if cfg.APIKey == "" {
			return nil, errors.New("no API key: run `wrenn login`, or set WRENN_API_KEY")
		}
		opts = append(opts, wrenn.WithAPIKey(cfg.APIKey))
	}
	return wrenn.New(cfg.URL, opts...)
}

// print writes v as JSON with --json, else calls table.
func (a *app) print(v any, table func(w *tabwriter.Writer)) error {
	if a.json {
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	table(w)
	return w.Flush()
}

func row(w io.Writer, cols ...any) {
	parts := make([]string, len(cols))
	for i, c := range cols {
		parts[i] = fmt.Sprint(c)
	}
	fmt.Fprintln(w, strings.Join(parts, "\t"))
}

func ago(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "-"
	}
	d := time.Since(*t).Round(time.Second)
	if d < 0 {
		return "now"
	}
	return d.String() + " ago"
}

func orDash[T any](p *T) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprint(*p)
}

// say prints a human line (skipped with --json, which prints data only).
func (a *app) say(format string, args ...any) {
	if !a.json {
		fmt.Fprintf(a.stdout, format+"\n", args...)
	}
}

func readPassword(a *app, prompt string) (string, error) {
	if v := os.Getenv("WRENN_PASSWORD"); v != "" {
		return v, nil
	}
	return promptHidden(a, prompt)
}
