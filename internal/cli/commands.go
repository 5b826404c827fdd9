package cli

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

func (a *app) loginCmd() *cobra.Command {
	var email, key string
	c := &cobra.Command{
		Use:   "login [URL]",
		Short: "Save the control plane URL and credentials (API key, or email and password)",
		Long: `Saves where the control plane is and how to sign in, in ~/.config/wrenn/config.json
(WRENN_CONFIG moves it). With --api-key the key is checked and saved. With --email you sign in with
your password (asked, or WRENN_PASSWORD); wrenn saves the 6-hour sign-in for host and key commands
and, if no key is saved yet, creates an API key named "wrenn-cli" for everything else.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig()
			if err != nil {
				return err
			}
			if len(args) == 1 {
				cfg.URL = args[0]
			} else if a.url != "" {
				cfg.URL = a.url
			}
			if key == "" && a.apiKey != "" {
				key = a.apiKey
			}
			if key == "" && email == "" {
				return fmt.Errorf("give --api-key KEY or --email EMAIL")
			}
			ctx := cmd.Context()
			if key != "" {
				c, err := wrenn.New(cfg.URL, wrenn.WithAPIKey(key))
				if err != nil {
					return err
				}
				if _, err := c.ListCapsules(ctx, wrenn.ListCapsulesParams{}); err != nil {
					return fmt.Errorf("the key does not work against %s: %w", cfg.URL, err)
				}
				cfg.APIKey = key
			}
			if email != "" {
				pw, err := readPassword(a, "Password for "+email+": ")
				if err != nil {
					return err
				}
				anon, err := wrenn.New(cfg.URL)
				if err != nil {
					return err
				}
				res, err := anon.Login(ctx, email, pw)
				if err != nil {
					return err
				}
				cfg.Token, cfg.TokenExpires = res.Token, time.Now().Add(6*time.Hour-time.Minute)
				if cfg.APIKey != "" && key == "" {
					// A key saved for another server (or a reset database) is replaced.
					old, _ := wrenn.New(cfg.URL, wrenn.WithAPIKey(cfg.APIKey))
					if _, err := old.ListCapsules(ctx, wrenn.ListCapsulesParams{}); wrenn.IsUnauthorized(err) {
						cfg.APIKey = ""
					}
				}
				if cfg.APIKey == "" {
					user, _ := wrenn.New(cfg.URL, wrenn.WithToken(res.Token))
					k, err := user.CreateAPIKey(ctx, "wrenn-cli")
					if err != nil {
						return fmt.Errorf("create an API key: %w", err)
					}
					cfg.APIKey = k.Key
				}
			}
			p, err := SaveConfig(cfg)
			if err != nil {
				return err
			}
			a.say("Signed in to %s; settings saved in %s", cfg.URL, p)
			return nil
		},
	}
	c.Flags().StringVar(&email, "email", "", "sign in with this account's email and password")
	c.Flags().StringVar(&key, "api-key", "", "save this API key")
	return c
}

func (a *app) capsuleTable(sbs ...wrenn.Capsule) func(w *tabwriter.Writer) {
	return func(w *tabwriter.Writer) {
		row(w, "ID", "STATUS", "TEMPLATE", "VCPUS", "MEMORY", "TIMEOUT", "STARTED", "FROM", "METADATA")
		for _, s := range sbs {
			status := s.Status
			if s.StatusReason != "" && (s.Status == "error" || s.Status == "missing") {
				status += " (" + s.StatusReason + ")"
			}
			timeout := "none"
			if s.TimeoutSec > 0 {
				timeout = (time.Duration(s.TimeoutSec) * time.Second).String()
			}
			var md []string
			for k, v := range s.Metadata {
				md = append(md, k+"="+v)
			}
			from := s.StartedFrom // boot, or memory (its template's)
			if from == "" {
				from = "-"
			}
			row(w, s.ID, status, s.Template, s.VCPUs, fmt.Sprintf("%d MB", s.MemoryMB), timeout, ago(s.StartedAt), from, strings.Join(md, ","))
		}
	}
}

func (a *app) sandboxCmd() *cobra.Command {
	sb := &cobra.Command{Use: "sandbox", Aliases: []string{"sb", "capsule"}, Short: "Create, list and manage capsules"}

	var p wrenn.CreateCapsuleParams
	var metadata, envs []string
	var timeout time.Duration
	var noWait bool
	var disk string
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a capsule (waits until it runs; --no-wait returns at once)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			if p.Metadata, err = pairs(metadata, "--metadata"); err != nil {
				return err
			}
			if p.Envs, err = pairs(envs, "--env"); err != nil {
				return err
			}
			p.TimeoutSec, p.Wait = int(timeout.Seconds()), !noWait
			if disk != "" {
				if p.DiskSizeMB, err = sizeMB(disk); err != nil {
					return fmt.Errorf("--disk: %w", err)
				}
			}
			s, err := c.CreateCapsule(cmd.Context(), p)
			if err != nil {
				return err
			}
			return a.print(s, a.capsuleTable(s))
		},
	}
	create.Flags().StringVarP(&p.Template, "template", "t", "", "template to start from (default minimal)")
	create.Flags().IntVar(&p.VCPUs, "vcpus", 0, "virtual CPUs (default 1)")
	create.Flags().IntVar(&p.MemoryMB, "memory", 0, "memory in MB (default 512)")
	create.Flags().StringVar(&disk, "disk", "", "root disk size: MB, or with a unit (10G, 512M); default 5G, thin")
	create.Flags().DurationVar(&timeout, "timeout", 0, "pause after this long idle, e.g. 10m (default: never)")
	create.Flags().StringArrayVarP(&envs, "env", "e", nil, "environment variable KEY=VALUE (repeatable)")
	create.Flags().StringArrayVarP(&metadata, "metadata", "m", nil, "metadata KEY=VALUE (repeatable)")
	create.Flags().BoolVar(&noWait, "no-wait", false, "return while the capsule is still starting")
	create.Flags().StringArrayVar(&p.HostTags, "host-tag", nil, "run on a host carrying this tag (repeatable)")
	create.Flags().BoolVar(&p.BYOC, "byoc", false, "run on one of your team's own (BYOC) hosts")
	create.Flags().BoolVar(&p.Public, "public", false, "let anyone reach the capsule's ports through the ingress (default: the team and holders of its traffic token)")
	create.Flags().BoolVar(&p.AutoResume, "auto-resume", false, "resume the capsule, when paused, on traffic to its ports")
	var egressMode string
	var egressCIDRs []string
	create.Flags().StringVar(&egressMode, "egress", "", "what the capsule may reach: allow_all (the public internet, default), deny_all or allow_list")
	create.Flags().StringArrayVar(&egressCIDRs, "egress-cidr", nil, "a CIDR for --egress allow_list to allow, or for allow_all to deny (repeatable)")
	create.PreRunE = func(*cobra.Command, []string) error {
		if egressMode == "" && len(egressCIDRs) == 0 {
			return nil
		}
		p.Egress = &wrenn.Egress{Mode: egressMode}
		if egressMode == "allow_list" {
			p.Egress.Allow = egressCIDRs
		} else {
			p.Egress.Deny = egressCIDRs
		}
		return nil
	}

	var statuses []string
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List capsules",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			md, err := pairs(metadata, "--metadata")
			if err != nil {
				return err
			}
			sbs, err := c.ListCapsules(cmd.Context(), wrenn.ListCapsulesParams{Statuses: statuses, Metadata: md})
			if err != nil {
				return err
			}
			return a.print(sbs, a.capsuleTable(sbs...))
		},
	}
	list.Flags().StringSliceVar(&statuses, "status", nil, "only these states (running,paused,...)")
	list.Flags().StringArrayVarP(&metadata, "metadata", "m", nil, "only capsules with metadata KEY=VALUE")

	one := func(use, short string, do func(c *wrenn.Client, cmd *cobra.Command, id string) (wrenn.Capsule, error)) *cobra.Command {
		return &cobra.Command{
			Use: use + " ID", Short: short, Args: cobra.ExactArgs(1),
			ValidArgsFunction: a.completeCapsules,
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client(false)
				if err != nil {
					return err
				}
				s, err := do(c, cmd, args[0])
				if err != nil {
					return err
				}
				return a.print(s, a.capsuleTable(s))
			},
		}
	}
	get := one("get", "Show a capsule", func(c *wrenn.Client, cmd *cobra.Command, id string) (wrenn.Capsule, error) {
		return c.GetCapsule(cmd.Context(), id)
	})
	kill := one("kill", "Destroy a capsule", func(c *wrenn.Client, cmd *cobra.Command, id string) (wrenn.Capsule, error) {
		return c.DestroyCapsule(cmd.Context(), id)
	})
	kill.Aliases = []string{"rm", "destroy"}
	pause := one("pause", "Pause a capsule (memory and disk kept)", func(c *wrenn.Client, cmd *cobra.Command, id string) (wrenn.Capsule, error) {
		return c.PauseCapsule(cmd.Context(), id)
	})
	resume := one("resume", "Resume a paused capsule", func(c *wrenn.Client, cmd *cobra.Command, id string) (wrenn.Capsule, error) {
		return c.ResumeCapsule(cmd.Context(), id)
	})
	var forks int
	fork := &cobra.Command{
		Use: "fork ID", Short: "Make new capsules with a running capsule's memory and disk as they are now",
		Args: cobra.ExactArgs(1), ValidArgsFunction: a.completeCapsules,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			made, err := c.ForkCapsule(cmd.Context(), args[0], forks)
			if err != nil {
				return err
			}
			return a.print(made, a.capsuleTable(made...))
		},
	}
	fork.Flags().IntVarP(&forks, "count", "n", 1, "how many capsules to make (1 to 16)")
	setTimeout := &cobra.Command{
		Use: "timeout ID DURATION", Short: "Set how long a capsule may stay idle before it pauses (0: never)",
		Args: cobra.ExactArgs(2), ValidArgsFunction: a.completeCapsules,
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := time.ParseDuration(args[1])
			if err != nil || d < 0 {
				return fmt.Errorf("duration %q: use e.g. 10m, 1h or 0", args[1])
			}
			c, err := a.client(false)
			if err != nil {
				return err
			}
			if err := c.SetTimeout(cmd.Context(), args[0], d); err != nil {
				return err
			}
			s, err := c.GetCapsule(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(s, a.capsuleTable(s))
		},
	}
	var withToken bool
	urlCmd := &cobra.Command{
		Use: "url ID PORT", Short: "Print the URL of a port in a capsule (through the control plane's ingress)",
		Args: cobra.ExactArgs(2), ValidArgsFunction: a.completeCapsules,
		RunE: func(cmd *cobra.Command, args []string) error {
			port, err := strconv.Atoi(args[1])
			if err != nil || port < 1 || port > 65535 {
				return fmt.Errorf("port %q: want a number from 1 to 65535", args[1])
			}
			c, err := a.client(false)
			if err != nil {
				return err
			}
			s, err := c.GetCapsule(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			u := s.URL(port)
			if withToken && !s.Public && s.TrafficAccessToken != "" && port != envdPort {
				// A link a browser can open: the ingress keeps the token in a cookie.
				u += "/?wrenn_traffic_token=" + s.TrafficAccessToken
			}
			return a.print(map[string]any{"id": s.ID, "port": port, "url": u, "public": s.Public}, func(w *tabwriter.Writer) { fmt.Fprintln(w, u) })
		},
	}
	urlCmd.Flags().BoolVar(&withToken, "with-token", false, "for a capsule that is not public, a link that carries its traffic token (for a browser)")
	ports := &cobra.Command{
		Use: "ports ID", Short: "List the ports servers in a capsule listen on, with their URLs",
		Args: cobra.ExactArgs(1), ValidArgsFunction: a.completeCapsules,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			ps, err := c.ListPorts(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(ps, func(w *tabwriter.Writer) {
				row(w, "PORT", "ADDRESSES", "PROCESS", "URL")
				for _, pt := range ps {
					addrs := strings.Join(pt.Addresses, ",")
					if pt.Forwarded {
						addrs += " (forwarded)"
					}
					proc := "-"
					if pt.PID > 0 {
						proc = fmt.Sprintf("%s (%d)", pt.Command, pt.PID)
					}
					row(w, pt.Port, addrs, proc, pt.URL)
				}
			})
		},
	}
	sb.AddCommand(create, list, get, kill, pause, resume, fork, setTimeout, urlCmd, ports)
	return sb
}

// envdPort is envd's port in every capsule; envd checks its own token.
const envdPort = 49983

// sizeMB reads a size in MB: a number, or one with a unit M/MB, G/GB,
// T/TB (binary multiples, as the API counts).
func sizeMB(v string) (int, error) {
	u := strings.ToUpper(strings.TrimSpace(v))
	mult := 1
	for _, unit := range []struct {
		suffix string
		mult   int
	}{{"TB", 1 << 20}, {"T", 1 << 20}, {"GB", 1 << 10}, {"G", 1 << 10}, {"MB", 1}, {"M", 1}} {
		if strings.HasSuffix(u, unit.suffix) {
			u, mult = strings.TrimSuffix(u, unit.suffix), unit.mult
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(u))
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%q is not a size: use MB, or e.g. 10G", v)
	}
	return n * mult, nil
}

// pairs parses KEY=VALUE flags.
func pairs(kvs []string, flag string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%s %q: want KEY=VALUE", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}

func (a *app) completeCapsules(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	c, err := a.client(false)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	sbs, err := c.ListCapsules(cmd.Context(), wrenn.ListCapsulesParams{})
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var ids []string
	for _, s := range sbs {
		ids = append(ids, s.ID+"\t"+s.Status+" "+s.Template)
	}
	return ids, cobra.ShellCompDirectiveNoFileComp
}

func (a *app) execCmd() *cobra.Command {
	var envs []string
	var cwd, user string
	var stdin bool
	var timeout time.Duration
	c := &cobra.Command{
		Use:   "exec ID -- COMMAND [ARGS...]",
		Short: "Run a command in a capsule, streaming its output; exits with its exit code",
		Long: `Run a command in a capsule. Its output streams as it comes and wrenn exits with the
command's exit code (127: no such command). -i streams this terminal's standard input to it.
Ctrl-C stops the command (and what it started) and exits 130. With --timeout the command is
killed when it runs longer (exit 124). --json prints one object at the end instead.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 {
				return fmt.Errorf("put -- between the capsule ID and the command: wrenn exec ID -- COMMAND")
			}
			c, err := a.client(false)
			if err != nil {
				return err
			}
			env, err := pairs(envs, "--env")
			if err != nil {
				return err
			}
			p := wrenn.ExecParams{Cmd: args[1], Args: args[2:], Envs: env, Cwd: cwd, User: user, TimeoutSec: int(timeout.Seconds())}
			if stdin {
				p.Stdin = a.stdin
			}
			var stdout, stderr bytes.Buffer
			code, err := c.ExecStream(cmd.Context(), args[0], p, func(stream string, data []byte) {
				switch {
				case a.json && stream == "stderr":
					stderr.Write(data)
				case a.json:
					stdout.Write(data)
				case stream == "stderr":
					_, _ = a.stderr.Write(data)
				default:
					_, _ = a.stdout.Write(data)
				}
			})
			switch {
			case errors.Is(err, wrenn.ErrTimedOut):
				fmt.Fprintf(a.stderr, "wrenn: the command ran longer than %s and was stopped\n", timeout)
				code, err = 124, nil
			case err != nil && cmd.Context().Err() != nil:
				fmt.Fprintln(a.stderr, "wrenn: interrupted; the command was stopped")
				return ExitError{Code: 130}
			case err != nil:
				return err
			}
			if a.json {
				if err := a.print(map[string]any{"exit_code": code, "stdout": stdout.String(), "stderr": stderr.String()}, nil); err != nil {
					return err
				}
			}
			if code != 0 {
				return ExitError{Code: code}
			}
			return nil
		},
		ValidArgsFunction: a.completeCapsules,
	}
	c.Flags().StringArrayVarP(&envs, "env", "e", nil, "environment variable KEY=VALUE (repeatable)")
	c.Flags().StringVar(&cwd, "cwd", "", "working directory")
	c.Flags().StringVarP(&user, "user", "u", "", "run as this user (default: the image's)")
	c.Flags().BoolVarP(&stdin, "stdin", "i", false, "stream standard input to the command (EOF closes its stdin)")
	c.Flags().DurationVar(&timeout, "timeout", 0, "stop the command after this long, e.g. 30s (default: none)")
	return c
}

func (a *app) shellCmd() *cobra.Command {
	var join, command string
	c := &cobra.Command{
		Use:               "shell ID",
		Short:             "Open an interactive terminal in a capsule (--join TAG rejoins one)",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeCapsules,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			return a.shell(cmd.Context(), c, args[0], command, join)
		},
	}
	c.Flags().StringVar(&join, "join", "", "rejoin the running session with this tag")
	c.Flags().StringVar(&command, "command", "", "program to run (default /bin/bash)")
	return c
}

func (a *app) filesCmd() *cobra.Command {
	f := &cobra.Command{Use: "files", Aliases: []string{"fs"}, Short: "Move and manage files in a capsule"}
	put := &cobra.Command{
		Use: "put ID LOCAL REMOTE", Short: "Upload a local file (- for standard input)", Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			var r io.Reader = a.stdin
			if args[1] != "-" {
				fh, err := os.Open(args[1])
				if err != nil {
					return err
				}
				defer fh.Close()
				r = fh
			}
			if err := c.WriteFile(cmd.Context(), args[0], args[2], bufio.NewReaderSize(r, 256<<10)); err != nil {
				return err
			}
			a.say("uploaded %s to %s:%s", args[1], args[0], args[2])
			return nil
		},
	}
	get := &cobra.Command{
		Use: "get ID REMOTE [LOCAL]", Short: "Download a file (to standard output without LOCAL, or LOCAL -)", Args: cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			body, err := c.ReadFile(cmd.Context(), args[0], args[1])
			if err != nil {
				return err
			}
			defer body.Close()
			if len(args) == 2 || args[2] == "-" {
				_, err = io.Copy(a.stdout, body)
				return err
			}
			dest := args[2]
			if st, err := os.Stat(dest); err == nil && st.IsDir() {
				dest = dest + "/" + path.Base(args[1])
			}
			tmp := dest + ".wrenn-part"
			out, err := os.Create(tmp)
			if err != nil {
				return err
			}
			if _, err := io.Copy(out, body); err != nil {
				out.Close()
				os.Remove(tmp)
				return fmt.Errorf("download %s: %w", args[1], err)
			}
			if err := out.Close(); err != nil {
				os.Remove(tmp)
				return err
			}
			if err := os.Rename(tmp, dest); err != nil {
				return err
			}
			a.say("downloaded %s:%s to %s", args[0], args[1], dest)
			return nil
		},
	}
	ls := &cobra.Command{
		Use: "ls ID [PATH]", Short: "List a directory (default: the home directory)", Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			dir := "/home/user"
			if len(args) == 2 {
				dir = args[1]
			}
			entries, err := c.ListDir(cmd.Context(), args[0], dir)
			if err != nil {
				return err
			}
			return a.print(entries, func(w *tabwriter.Writer) {
				row(w, "MODE", "SIZE", "MODIFIED", "NAME")
				for _, e := range entries {
					name := e.Name
					if e.Type == "directory" {
						name += "/"
					}
					row(w, e.Permissions, e.Size, time.Unix(e.ModifiedAt, 0).Format("2006-01-02 15:04"), name)
				}
			})
		},
	}
	simple := func(use, short, done string, do func(c *wrenn.Client, cmd *cobra.Command, id, p string) error) *cobra.Command {
		return &cobra.Command{Use: use + " ID PATH", Short: short, Args: cobra.ExactArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client(false)
				if err != nil {
					return err
				}
				if err := do(c, cmd, args[0], args[1]); err != nil {
					return err
				}
				a.say(done, args[1])
				return nil
			}}
	}
	rm := simple("rm", "Remove a file or directory tree", "removed %s", func(c *wrenn.Client, cmd *cobra.Command, id, p string) error {
		return c.Remove(cmd.Context(), id, p)
	})
	mkdir := simple("mkdir", "Make a directory (and its parents)", "made %s", func(c *wrenn.Client, cmd *cobra.Command, id, p string) error {
		return c.MakeDir(cmd.Context(), id, p)
	})
	f.AddCommand(put, get, ls, rm, mkdir)
	return f
}

func (a *app) templateCmd() *cobra.Command {
	t := &cobra.Command{Use: "template", Aliases: []string{"templates"}, Short: "List, build and delete templates"}
	list := &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List templates", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			ts, err := c.ListTemplates(cmd.Context())
			if err != nil {
				return err
			}
			return a.print(ts, func(w *tabwriter.Writer) {
				row(w, "NAME", "TYPE", "OWNER", "SIZE", "MEMORY", "CREATED")
				for _, tp := range ts {
					owner := "team"
					if tp.Platform {
						owner = "platform"
					}
					size := "-"
					if tp.SizeBytes > 0 {
						size = fmt.Sprintf("%d MB", tp.SizeBytes>>20)
					}
					// Whether capsules start from its memory, and at which shape.
					memory := "-"
					if tp.HasMemory && tp.VCPUs != nil && tp.MemoryMB != nil {
						memory = fmt.Sprintf("yes (%d vCPU, %d MB)", *tp.VCPUs, *tp.MemoryMB)
					}
					row(w, tp.Name, tp.Type, owner, size, memory, tp.CreatedAt.Format("2006-01-02 15:04"))
				}
			})
		},
	}
	var file, archive string
	var detach bool
	build := &cobra.Command{
		Use:   "build -f RECIPE.json [--archive FILES.tar.gz]",
		Short: "Build a template from a recipe, following its log",
		Long: `A recipe is JSON, in upstream Wrenn's form:
  {"name": "web", "recipe": ["RUN --timeout=5m apt-get install -y nginx", "COPY site /srv/site",
   "START nginx -g 'daemon off;'"], "healthcheck": "--interval=1s curl -fs localhost"}
(RUN, START, ENV, WORKDIR, USER and COPY, which reads the --archive; skip_pre_post skips the platform's
apt-get update before and clean-up after), or as shell commands:
  {"name": "py", "commands": ["apt-get install -y python3"], "healthcheck": {"cmd": "python3 -V"}}.
The steps run in a fresh capsule; it becomes the template (with its memory when there is a health check).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(a.stdin)
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return fmt.Errorf("read the recipe: %w", err)
			}
			if !json.Valid(data) {
				return fmt.Errorf("%s is not a JSON recipe", file)
			}
			c, err := a.client(false)
			if err != nil {
				return err
			}
			var arch io.Reader
			if archive != "" {
				f, err := os.Open(archive)
				if err != nil {
					return fmt.Errorf("open the archive: %w", err)
				}
				defer f.Close()
				arch = f
			}
			b, err := c.StartBuildJSON(cmd.Context(), data, arch, filepath.Base(archive))
			if err != nil {
				return err
			}
			if detach {
				return a.print(b, func(w *tabwriter.Writer) { row(w, "BUILD", "STATUS"); row(w, b.ID, b.Status) })
			}
			a.say("build %s pending", b.ID)
			b, err = c.WaitBuild(cmd.Context(), b.ID, func(text string) {
				if !a.json {
					fmt.Fprint(a.stdout, text)
				}
			})
			if err != nil {
				return err
			}
			if a.json {
				b.Output = ""
				if err := a.print(b, nil); err != nil {
					return err
				}
			}
			if b.Status != "success" {
				return fmt.Errorf("build %s %s: %s", b.ID, b.Status, b.Error)
			}
			return nil
		},
	}
	build.Flags().StringVarP(&file, "file", "f", "", "recipe file (- for standard input)")
	_ = build.MarkFlagRequired("file")
	build.Flags().BoolVar(&detach, "detach", false, "print the build ID and return")
	build.Flags().StringVar(&archive, "archive", "", "tar, tar.gz or zip file whose contents COPY steps read")
	del := &cobra.Command{
		Use: "delete NAME", Aliases: []string{"rm"}, Short: "Delete one of the team's templates", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			if err := c.DeleteTemplate(cmd.Context(), args[0]); err != nil {
				return err
			}
			a.say("deleted template %s", args[0])
			return nil
		},
	}
	t.AddCommand(list, build, del)
	return t
}

func (a *app) snapshotCmd() *cobra.Command {
	s := &cobra.Command{Use: "snapshot", Short: "Save running capsules as templates"}
	var name string
	create := &cobra.Command{
		Use: "create ID", Short: "Save a capsule's memory and disk as a template (it keeps running)", Args: cobra.ExactArgs(1),
		ValidArgsFunction: a.completeCapsules,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(false)
			if err != nil {
				return err
			}
			t, err := c.CreateSnapshot(cmd.Context(), args[0], name)
			if err != nil {
				return err
			}
			return a.print(t, func(w *tabwriter.Writer) {
				row(w, "NAME", "TYPE", "SIZE")
				row(w, t.Name, t.Type, fmt.Sprintf("%d MB", t.SizeBytes>>20))
			})
		},
	}
	create.Flags().StringVarP(&name, "name", "n", "", "template name (default: generated)")
	s.AddCommand(create)
	return s
}

func (a *app) hostCmd() *cobra.Command {
	h := &cobra.Command{Use: "host", Aliases: []string{"hosts"}, Short: "Hosts running wrenn-agent (needs `wrenn login --email`)"}
	list := &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List hosts", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client(true)
			if err != nil {
				return err
			}
			hs, err := c.ListHosts(cmd.Context())
			if err != nil {
				return err
			}
			return a.print(hs, func(w *tabwriter.Writer) {
				row(w, "ID", "STATUS", "ADDRESS", "CPUS", "MEMORY", "VMM", "HEARTBEAT", "TAGS")
				for _, x := range hs {
					row(w, x.ID, x.Status, orDash(x.Address), orDash(x.CPUCores), orDash(x.MemoryMB), orDash(x.VMM), ago(x.LastHeartbeatAt), strings.Join(x.Tags, ","))
				}
			})
		},
	}
	token := &cobra.Command{
		Use: "token", Short: "Create a host and print its one-time registration command", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client(true)
			if err != nil {
				return err
			}
			host, tok, err := c.CreateHost(cmd.Context())
			if err != nil {
				return err
			}
			out := map[string]string{"host_id": host.ID, "registration_token": tok}
			if a.json {
				return a.print(out, nil)
			}
			fmt.Fprintf(a.stdout, "Host %s. On the new host, within one hour, run:\n\n  WRENN_REGISTRATION_TOKEN=%s wrenn-agent --address <its-ip>:50051 --cp-url %s\n",
				host.ID, tok, c.BaseURL())
			return nil
		},
	}
	h.AddCommand(list, token)
	return h
}

func (a *app) keyCmd() *cobra.Command {
	k := &cobra.Command{Use: "key", Aliases: []string{"keys"}, Short: "The team's API keys (needs `wrenn login --email`)"}
	list := &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List API keys", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client(true)
			if err != nil {
				return err
			}
			keys, err := c.ListAPIKeys(cmd.Context())
			if err != nil {
				return err
			}
			return a.print(keys, func(w *tabwriter.Writer) {
				row(w, "ID", "NAME", "PREFIX", "MADE BY", "CREATED", "LAST USED")
				for _, x := range keys {
					by := "a removed user"
					if x.CreatorEmail != nil {
						by = *x.CreatorEmail
					}
					if !x.Active {
						by += " (suspended)"
					}
					row(w, x.ID, x.Name, x.KeyPrefix, by, x.CreatedAt.Format("2006-01-02 15:04"), ago(x.LastUsed))
				}
			})
		},
	}
	var e2bFormat bool
	create := &cobra.Command{
		Use: "create NAME", Short: "Create an API key (shown once)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(true)
			if err != nil {
				return err
			}
			format := wrenn.KeyFormatWrenn
			if e2bFormat {
				format = wrenn.KeyFormatE2B
			}
			key, err := c.CreateAPIKey(cmd.Context(), args[0], format)
			if err != nil {
				return err
			}
			if a.json {
				return a.print(key, nil)
			}
			fmt.Fprintf(a.stdout, "Key %s (%s). Copy it now; it is not shown again:\n\n  %s\n", key.ID, key.Name, key.Key)
			return nil
		},
	}
	revoke := &cobra.Command{
		Use: "revoke ID", Short: "Revoke an API key", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client(true)
			if err != nil {
				return err
			}
			if err := c.RevokeAPIKey(cmd.Context(), args[0]); err != nil {
				return err
			}
			a.say("revoked %s", args[0])
			return nil
		},
	}
	create.Flags().BoolVar(&e2bFormat, "e2b", false, "write the key in E2B's format (e2b_...), for E2B's SDKs as E2B_API_KEY")
	k.AddCommand(list, create, revoke)
	return k
}

// promptHidden reads a password from the terminal without echo.
func promptHidden(a *app, prompt string) (string, error) {
	f, ok := a.stdin.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		line, err := bufio.NewReader(a.stdin).ReadString('\n')
		if err != nil && line == "" {
			return "", fmt.Errorf("read the password: %w", err)
		}
		return strings.TrimRight(line, "\r\n"), nil
	}
	fmt.Fprint(a.stderr, prompt)
	b, err := term.ReadPassword(int(f.Fd()))
	fmt.Fprintln(a.stderr)
	return string(b), err
}
