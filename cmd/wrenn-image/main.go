// Command wrenn-image manages the guest templates on a host: it installs
// and imports images into $WRENN_DIR/images, and flattens, grows, shrinks
// and checksums them.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/wrenn/wrenn/internal/guest/ext4"
	"github.com/wrenn/wrenn/internal/guest/imageimport"
	"github.com/wrenn/wrenn/internal/guest/template"
	"github.com/wrenn/wrenn/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "wrenn-image:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	var wrennDir string
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	store := func() template.Store { return template.Store{Dir: filepath.Join(wrennDir, "images")} }

	root := &cobra.Command{
		Use:           "wrenn-image",
		Short:         "Manage guest templates in $WRENN_DIR/images",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	defaultDir := os.Getenv("WRENN_DIR")
	if defaultDir == "" {
		defaultDir = "/var/lib/wrenn"
	}
	root.PersistentFlags().StringVar(&wrennDir, "dir", defaultDir, "Wrenn's host directory (WRENN_DIR)")

	var from, envd, source, parent string
	install := &cobra.Command{
		Use:   "install --name NAME --from IMAGE.ext4",
		Short: "Copy an ext4 image into the store as a template",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			name, _ := cmd.Flags().GetString("name")
			meta, err := store().Install(cmd.Context(), name, from, template.Metadata{Source: source, Parent: parent, EnvdVersion: envdVersion(cmd.Context(), envd)})
			if err != nil {
				return err
			}
			log.Info("template installed", "name", meta.Name, "path", store().RootfsPath(name), "bytes", meta.SizeBytes, "sha256", meta.SHA256[:12])
			return nil
		},
	}
	install.Flags().String("name", "", "template name")
	install.Flags().StringVar(&from, "from", "", "ext4 image to install")
	install.Flags().StringVar(&envd, "envd", "", "the envd binary inside the image, to record its version")
	install.Flags().StringVar(&source, "source", "debootstrap", "how the image was made")
	install.Flags().StringVar(&parent, "parent", "", "template this one derives from")
	mustRequire(install, "name", "from")

	var initBin, tini, headroom string
	imp := &cobra.Command{
		Use:   "import --name NAME IMAGE.tar|OCI-DIR",
		Short: "Import a docker-save tarball or OCI layout as a template (no Docker engine needed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, _ := cmd.Flags().GetString("name")
			if err := template.ValidateName(name); err != nil {
				return err
			}
			room, err := parseSize(headroom)
			if err != nil {
				return fmt.Errorf("--headroom: %w", err)
			}
			s := store()
			if err := os.MkdirAll(s.Dir, 0o755); err != nil {
				return err
			}
			tmp := filepath.Join(s.Dir, "."+name+".import.ext4")
			defer os.Remove(tmp)
			start := time.Now()
			if err := imageimport.ToExt4(cmd.Context(), args[0], tmp, imageimport.Options{
				Envd: envd, Init: initBin, Tini: tini, Headroom: room, WorkDir: s.Dir, Log: log,
			}); err != nil {
				return err
			}
			meta, err := s.Install(cmd.Context(), name, tmp, template.Metadata{Source: "import:" + filepath.Base(args[0]), Parent: parent, EnvdVersion: envdVersion(cmd.Context(), envd)})
			if err != nil {
				return err
			}
			log.Info("image imported", "name", name, "bytes", meta.SizeBytes, "took", time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	imp.Flags().String("name", "", "template name")
	imp.Flags().StringVar(&envd, "envd", "builds/envd", "envd binary to inject")
	imp.Flags().StringVar(&initBin, "init", "builds/wrenn-init", "wrenn-init binary to inject")
	imp.Flags().StringVar(&tini, "tini", "/usr/bin/tini-static", "static tini to inject when the image has none")
	imp.Flags().StringVar(&headroom, "headroom", "256M", "free space to leave for the sandbox's files")
	imp.Flags().StringVar(&parent, "parent", "", "template this one derives from")
	mustRequire(imp, "name")

	list := &cobra.Command{
		Use:   "list",
		Short: "List templates",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			all, err := store().List()
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tCREATED\tSOURCE\tPARENT\tENVD")
			for _, m := range all {
				fmt.Fprintf(tw, "%s\t%d MiB\t%s\t%s\t%s\t%s\n", m.Name, m.SizeBytes>>20, m.Created.Format(time.RFC3339), m.Source, m.Parent, m.EnvdVersion)
			}
			return tw.Flush()
		},
	}

	show := &cobra.Command{
		Use:   "show NAME",
		Short: "Print a template's metadata as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := store().Get(args[0])
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(m)
		},
	}

	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a template",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return store().Delete(args[0])
		},
	}

	flatten := &cobra.Command{
		Use:   "flatten --name NAME --parent PARENT CHILD-DISK",
		Short: "Turn a copy-on-write child disk (qcow2 overlay or sparse copy) into a standalone template",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, _ := cmd.Flags().GetString("name")
			if err := template.ValidateName(name); err != nil {
				return err
			}
			tmp := filepath.Join(store().Dir, "."+name+".flatten.ext4")
			defer os.Remove(tmp)
			if err := template.Flatten(cmd.Context(), args[0], "", tmp); err != nil {
				return err
			}
			parentMeta, _ := store().Get(parent)
			_, err := store().Install(cmd.Context(), name, tmp, template.Metadata{Source: "flatten", Parent: parent, EnvdVersion: parentMeta.EnvdVersion})
			return err
		},
	}
	flatten.Flags().String("name", "", "new template name")
	flatten.Flags().StringVar(&parent, "parent", "", "template the child disk was made from")
	mustRequire(flatten, "name")

	var size string
	grow := &cobra.Command{
		Use:   "grow NAME --size SIZE",
		Short: "Grow a template's disk and file system",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			return resizeTemplate(cmd.Context(), store(), args[0], func(path string) error { return ext4.Grow(cmd.Context(), path, n) })
		},
	}
	grow.Flags().StringVar(&size, "size", "", "new size, e.g. 2G")
	mustRequire(grow, "size")

	shrink := &cobra.Command{
		Use:   "shrink NAME",
		Short: "Shrink a template to its minimum plus headroom",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(headroom)
			if err != nil {
				return fmt.Errorf("--headroom: %w", err)
			}
			return resizeTemplate(cmd.Context(), store(), args[0], func(path string) error { return ext4.Shrink(cmd.Context(), path, n) })
		},
	}
	shrink.Flags().StringVar(&headroom, "headroom", "64M", "free space to keep")

	checksum := &cobra.Command{
		Use:   "checksum NAME",
		Short: "Verify a template's image against its recorded SHA-256",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := store().Get(args[0])
			if err != nil {
				return err
			}
			sum, err := template.Checksum(store().RootfsPath(args[0]))
			if err != nil {
				return err
			}
			if sum != m.SHA256 {
				return fmt.Errorf("template %s is corrupt: sha256 %s, recorded %s", args[0], sum, m.SHA256)
			}
			fmt.Fprintln(cmd.OutOrStdout(), sum)
			return nil
		},
	}

	root.AddCommand(install, imp, list, show, del, flatten, grow, shrink, checksum)
	return root
}

// resizeTemplate changes a copy of the image and installs it in place, so
// a failure leaves the template as it was.
func resizeTemplate(ctx context.Context, s template.Store, name string, change func(string) error) error {
	m, err := s.Get(name)
	if err != nil {
		return err
	}
	tmp := filepath.Join(s.Dir, "."+name+".resize.ext4")
	defer os.Remove(tmp)
	if err := template.SparseCopy(ctx, s.RootfsPath(name), tmp); err != nil {
		return err
	}
	if err := change(tmp); err != nil {
		return err
	}
	_, err = s.Install(ctx, name, tmp, template.Metadata{Source: m.Source, Parent: m.Parent, EnvdVersion: m.EnvdVersion, Created: m.Created})
	return err
}

func mustRequire(cmd *cobra.Command, flags ...string) {
	for _, f := range flags {
		if err := cmd.MarkFlagRequired(f); err != nil {
			panic(err) // a programming error: the flag is not defined
		}
	}
}

// parseSize reads sizes like 512M, 2G or a plain byte count.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToUpper(s))
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 0 || fmt.Sprint(n) != s {
		return 0, fmt.Errorf("%q is not a size like 512M or 2G", s)
	}
	return n * mult, nil
}

// envdVersion asks an envd binary for its version; "" if unknown.
func envdVersion(ctx context.Context, bin string) string {
	if bin == "" {
		return ""
	}
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			return ""
		}
	}
	return strings.TrimSpace(string(out))
}
