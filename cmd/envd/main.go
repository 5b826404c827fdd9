// Command envd is the guest agent that runs inside every Wrenn sandbox.
// wrenn-init starts it under tini; `envd --dev` runs it on a developer
// machine without a VM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/envd/ports"
	"github.com/wrenn/wrenn/internal/envd/server"
	"github.com/wrenn/wrenn/internal/version"
)

// DefaultPort is where envd listens inside a sandbox.
const DefaultPort = 49983

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "envd:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("envd", flag.ContinueOnError)
	port := fs.Int("port", DefaultPort, "TCP port to listen on")
	addr := fs.String("addr", "", "IP address to listen on (default: all; 127.0.0.1 with --dev)")
	dev := fs.Bool("dev", false, "run on a developer machine: act as the current user by default, never touch the clock, listen on loopback")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	tokenFile := fs.String("access-token-file", "", "file holding the access token every request must carry (X-Access-Token) from the start; /init may change it")
	forward := fs.Bool("forward-loopback", true, "make servers bound only to 127.0.0.1/::1 reachable on the guest's own addresses (off with --dev)")
	identityDir := fs.String("identity-dir", "/run/wrenn", "where /init writes the sandbox's identity, .WRENN_SANDBOX_ID and .WRENN_TEMPLATE_ID (off with --dev)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *showVersion {
		fmt.Println(version.Version)
		return nil
	}
	if *port < 0 || *port > 65535 {
		return fmt.Errorf("--port %d is out of range", *port)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	cfg := server.Config{Log: log, Version: version.Version, FallbackUser: "user", SetClock: true, Port: uint16(*port), IdentityDir: *identityDir}
	if *tokenFile != "" {
		data, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("--access-token-file: %w", err)
		}
		if cfg.AccessToken = strings.TrimSpace(string(data)); cfg.AccessToken == "" {
			return fmt.Errorf("--access-token-file %s is empty", *tokenFile)
		}
	}
	listenIP := *addr
	if *dev {
		me, err := user.Current()
		if err != nil {
			return fmt.Errorf("look up current user: %w", err)
		}
		cfg.FallbackUser, cfg.SetClock, cfg.IdentityDir, *forward = me.Username, false, "", false
		if listenIP == "" {
			listenIP = "127.0.0.1"
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *forward {
		cfg.Forwarder = &ports.Forwarder{Log: log, Except: []uint16{uint16(*port)}}
		go cfg.Forwarder.Run(ctx)
	}
	srv := server.New(cfg)

	ln, err := net.Listen("tcp", net.JoinHostPort(listenIP, strconv.Itoa(*port)))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // Connect clients may speak h2c
	hs := &http.Server{
		Handler:           srv.Handler(),
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}

	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	// guest_uptime is the time since the kernel started: in a VM, boot-to-ready.
	log.Info("envd listening", "addr", ln.Addr().String(), "version", version.Version, "dev", *dev, "default_user", cfg.FallbackUser, "guest_uptime", uptime())

	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("envd stopping")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown() // ends processes first, so their streams finish
	_ = hs.Shutdown(shutdownCtx)
	return nil
}

// uptime reads the seconds since boot from /proc/uptime.
func uptime() string {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "unknown"
	}
	secs, _, _ := strings.Cut(string(data), " ")
	return secs + "s"
}
