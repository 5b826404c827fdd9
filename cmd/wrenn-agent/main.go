// Command wrenn-agent turns a Linux host into sandbox capacity: it boots
// and supervises microVMs and serves the control plane over Connect RPC.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/proxy"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/agent/server"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/firecracker"
	"github.com/wrenn/wrenn/internal/agent/vmm/qemu"
	"github.com/wrenn/wrenn/internal/kvm"
	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/internal/version"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "wrenn-agent:", err)
		os.Exit(1)
	}
}

func envInt(key string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(key)); err == nil {
		return n
	}
	return def
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func run() error {
	fs := flag.NewFlagSet("wrenn-agent", flag.ContinueOnError)
	listen := fs.String("listen", envOr("WRENN_HOST_LISTEN_ADDR", ":50051"), "address for the control plane's RPCs (WRENN_HOST_LISTEN_ADDR)")
	proxyListen := fs.String("proxy-listen", envOr("WRENN_PROXY_LISTEN_ADDR", "127.0.0.1:5007"), "address of the proxy to sandbox ports, <port>-<sandbox>.<domain>; \"off\" disables (WRENN_PROXY_LISTEN_ADDR)")
	dir := fs.String("dir", envOr("WRENN_DIR", "/var/lib/wrenn"), "host directory with kernels/, images/, sandboxes/, snapshots/ (WRENN_DIR)")
	vmmName := fs.String("vmm", envOr("WRENN_VMM", "auto"), "VMM driver: auto, qemu or firecracker (WRENN_VMM)")
	fcBinary := fs.String("firecracker", envOr("WRENN_FIRECRACKER", "firecracker"), "firecracker binary (WRENN_FIRECRACKER)")
	lazy := fs.Bool("lazy-memory", envOr("WRENN_LAZY_MEMORY", "") == "1", "Firecracker: resume through the UFFD page-fault handler (WRENN_LAZY_MEMORY=1)")
	jailer := fs.String("jailer", envOr("WRENN_JAILER", ""), "Firecracker: run each VM under this jailer binary (WRENN_JAILER)")
	jailUID := fs.Int("jailer-uid", envInt("WRENN_JAILER_UID", 65534), "Firecracker: the uid jailed VMMs run as (WRENN_JAILER_UID)")
	jailGID := fs.Int("jailer-gid", envInt("WRENN_JAILER_GID", 65534), "Firecracker: the gid jailed VMMs run as (WRENN_JAILER_GID)")
	jailBase := fs.String("jailer-chroot", envOr("WRENN_JAILER_CHROOT", "/srv/jailer"), "Firecracker: the jailer's chroot base directory (WRENN_JAILER_CHROOT)")
	diffSnaps := fs.Bool("diff-snapshots", envOr("WRENN_DIFF_SNAPSHOTS", "") == "1", "Firecracker: pausing a resumed sandbox writes only the pages it changed (WRENN_DIFF_SNAPSHOTS=1)")
	diskName := fs.String("disk", envOr("WRENN_DISK", "qcow2"), "sandbox disks: qcow2 overlays, copy (sparse copies) or dm (device-mapper snapshots) (WRENN_DISK)")
	dns := fs.String("dns", envOr("WRENN_GUEST_DNS", "1.1.1.1,8.8.8.8"), "resolvers for guests, comma-separated (WRENN_GUEST_DNS)")
	timeout := fs.Duration("default-timeout", 5*time.Minute, "sandbox timeout when a create names none")
	tlsCert := fs.String("tls-cert", envOr("WRENN_AGENT_TLS_CERT", ""), "serve RPCs over TLS with this certificate (WRENN_AGENT_TLS_CERT)")
	tlsKey := fs.String("tls-key", envOr("WRENN_AGENT_TLS_KEY", ""), "the certificate's key (WRENN_AGENT_TLS_KEY)")
	clientCA := fs.String("tls-client-ca", envOr("WRENN_AGENT_TLS_CLIENT_CA", ""), "require client certificates signed by this CA: mutual TLS (WRENN_AGENT_TLS_CLIENT_CA)")
	logLevel := fs.String("log-level", envOr("WRENN_LOG_LEVEL", "info"), "debug, info, warn or error")
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
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	token, err := hostToken(*dir)
	if err != nil {
		return err
	}
	var resolvers []netip.Addr
	for _, s := range strings.Split(*dns, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("--dns: %w", err)
		}
		resolvers = append(resolvers, a)
	}
	fc := firecracker.Driver{Binary: *fcBinary, Log: log, LazyMemory: *lazy, DiffSnapshots: *diffSnaps}
	if *jailer != "" {
		fc.Jailer = &firecracker.Jailer{Binary: *jailer, UID: *jailUID, GID: *jailGID, ChrootBase: *jailBase}
	}
	driver, accel, err := chooseVMM(*vmmName, fc)
	if err != nil {
		return err
	}
	if driver.Name() == "firecracker" && *diskName == "qcow2" {
		// Firecracker reads raw images only: device-mapper snapshots where
		// the host has device-mapper, else sparse copies.
		*diskName = "copy"
		if disk.Available() == nil {
			*diskName = "dm"
		}
	}
	disks, err := disk.ForName(*diskName)
	if err != nil {
		return err
	}
	log.Info("VMM chosen", "vmm", driver.Name(), "accelerator", accel, "requested", *vmmName, "disks", disks.Name())

	mgr := sandbox.New(sandbox.Config{
		WrennDir: *dir, Driver: driver, Disks: disks, Net: &network.Manager{Log: log}, Log: log,
		DNS: resolvers, DefaultTimeout: *timeout, HostMemoryMiB: int(hostMemoryMiB()),
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := mgr.Start(ctx); err != nil {
		return err
	}

	tlsConfig, err := serverTLS(*tlsCert, *tlsKey, *clientCA)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	if tlsConfig != nil {
		ln = tls.NewListener(ln, tlsConfig)
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	hs := &http.Server{
		Handler: server.Handler(server.Config{
			Manager: mgr, Token: token, Log: log, WrennDir: *dir,
			VMM: driver.Name(), Accel: accel, Version: version.Version,
		}),
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 2)
	go func() { errc <- hs.Serve(ln) }()
	var ps *http.Server
	if *proxyListen != "off" {
		pln, err := net.Listen("tcp", *proxyListen)
		if err != nil {
			return fmt.Errorf("proxy listen: %w", err)
		}
		ps = &http.Server{Handler: &proxy.Handler{Sandboxes: mgr, Log: log}, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		go func() { errc <- ps.Serve(pln) }()
		log.Info("sandbox proxy listening", "addr", pln.Addr().String())
	}
	log.Info("wrenn-agent listening", "addr", ln.Addr().String(), "tls", tlsConfig != nil, "mutual_tls", *clientCA != "", "dir", *dir, "version", version.Version, "sandboxes", len(mgr.List()))
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	// The VMs keep running: the next agent start re-adopts them.
	log.Info("wrenn-agent stopping; sandboxes keep running")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if ps != nil {
		_ = ps.Shutdown(shutdownCtx)
	}
	return hs.Shutdown(shutdownCtx)
}

// chooseVMM picks the driver: Firecracker needs a working KVM and its
// binary; QEMU runs anywhere (TCG without KVM). auto prefers Firecracker.
func chooseVMM(name string, fc firecracker.Driver) (vmm.Driver, string, error) {
	fcPath, fcErr := exec.LookPath(fc.Binary)
	fc.Binary = fcPath
	fcReady := kvm.Usable() && fcErr == nil
	switch name {
	case "auto":
		if fcReady {
			return &fc, "kvm", nil
		}
	case "qemu":
	case "firecracker":
		if !kvm.Usable() {
			return nil, "", errors.New("--vmm firecracker: no usable KVM on this host (needs /dev/kvm and a CPU with vmx or svm); use qemu")
		}
		if fcErr != nil {
			return nil, "", fmt.Errorf("--vmm firecracker: %w", fcErr)
		}
		return &fc, "kvm", nil
	default:
		return nil, "", fmt.Errorf("--vmm %q: use auto, qemu or firecracker", name)
	}
	q := qemu.New(fc.Log)
	return q, q.Accelerator(), nil
}

// serverTLS builds the RPC server's TLS settings: none without a
// certificate; client certificates required when a client CA is given.
func serverTLS(certFile, keyFile, clientCA string) (*tls.Config, error) {
	if certFile == "" && keyFile == "" {
		if clientCA != "" {
			return nil, errors.New("--tls-client-ca needs --tls-cert and --tls-key")
		}
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
	if clientCA != "" {
		pem, err := os.ReadFile(clientCA)
		if err != nil {
			return nil, fmt.Errorf("client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CA %s holds no PEM certificate", clientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// hostToken is the credential the control plane presents on every call:
// WRENN_HOST_TOKEN, else $WRENN_DIR/host-token (written at registration).
func hostToken(dir string) (string, error) {
	source, t := "WRENN_HOST_TOKEN", os.Getenv("WRENN_HOST_TOKEN")
	if t == "" {
		source = filepath.Join(dir, "host-token")
		data, err := os.ReadFile(source)
		if err != nil {
			return "", fmt.Errorf("no host token: set WRENN_HOST_TOKEN or register the host so that %s exists (%w)", source, err)
		}
		t = strings.TrimSpace(string(data))
	}
	if len(t) < 16 {
		return "", fmt.Errorf("the host token from %s is shorter than 16 characters", source)
	}
	return t, nil
}

// hostMemoryMiB is the memory sandboxes may reserve: three quarters of
// the host's, the rest kept for the host itself (agent, page cache, VMM overhead).
func hostMemoryMiB() int64 {
	total, err := procfs.Mem("MemTotal")
	if err != nil {
		return 0
	}
	return total >> 20 * 3 / 4
}
