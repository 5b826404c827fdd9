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
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/agent/cgroup"
	"github.com/wrenn/wrenn/internal/agent/disk"
	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/privdrop"
	"github.com/wrenn/wrenn/internal/agent/registration"
	"github.com/wrenn/wrenn/internal/agent/sandbox"
	"github.com/wrenn/wrenn/internal/agent/server"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/agent/vmm/firecracker"
	"github.com/wrenn/wrenn/internal/agent/vmm/qemu"
	"github.com/wrenn/wrenn/internal/envconf"
	"github.com/wrenn/wrenn/internal/kvm"
	"github.com/wrenn/wrenn/internal/procfs"
	"github.com/wrenn/wrenn/internal/version"
	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "uffd-handler" {
		// A lazily restored VM's page-fault handler, started per VM by
		// the agent (see firecracker.Driver.UFFDHandler).
		os.Exit(firecracker.HandlerMain(os.Args[2:]))
	}
	if err := keepTokenOffCommandLine(); err != nil {
		fmt.Fprintln(os.Stderr, "wrenn-agent:", err)
		os.Exit(1)
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "wrenn-agent:", err)
		os.Exit(1)
	}
}

// keepTokenOffCommandLine: a registration token given with --register on
// the command line (as the operator contract allows) is visible to every
// user of the machine through ps and /proc; the agent moves it into its
// environment and starts again without it, at once.
// WRENN_REGISTRATION_TOKEN keeps it off the command line altogether.
func keepTokenOffCommandLine() error {
	args, token, found := withoutRegisterToken(os.Args[1:])
	if !found {
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("restart without the token on the command line: %w", err)
	}
	// The flag's token wins over one the environment held already.
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "WRENN_REGISTRATION_TOKEN=") {
			env = append(env, kv)
		}
	}
	env = append(env, "WRENN_REGISTRATION_TOKEN="+token)
	return syscall.Exec(self, append([]string{os.Args[0], "--register-env"}, args...), env)
}

// withoutRegisterToken takes "--register TOKEN" (or -register, =TOKEN)
// out of args.
func withoutRegisterToken(args []string) (rest []string, token string, found bool) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(rest, args[i:]...), token, found
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "register" {
			rest = append(rest, a)
			continue
		}
		switch {
		case hasValue:
			token, found = value, true
		case i+1 < len(args):
			token, found = args[i+1], true
			i++
		default:
			rest = append(rest, a) // no value: the flag parser says so
		}
	}
	return rest, token, found
}

func run() error {
	// What the agent and its VMMs write (disks, snapshots, templates,
	// logs) is tenant data: readable by the agent's user alone.
	syscall.Umask(0o077)
	fs := flag.NewFlagSet("wrenn-agent", flag.ContinueOnError)
	var envErrs []error // numbers in the environment that do not parse
	envInt := func(key string, def int) int {
		n, err := envconf.Int(key, def)
		envErrs = append(envErrs, err)
		return n
	}
	listen := fs.String("listen", envconf.String("WRENN_HOST_LISTEN_ADDR", ":50051"), "address for the control plane's RPCs (WRENN_HOST_LISTEN_ADDR)")
	dir := fs.String("dir", envconf.String("WRENN_DIR", "/var/lib/wrenn"), "host directory with kernels/, images/, sandboxes/, snapshots/ (WRENN_DIR)")
	vmmName := fs.String("vmm", envconf.String("WRENN_VMM", "auto"), "VMM driver: auto, qemu or firecracker (WRENN_VMM)")
	fcBinary := fs.String("firecracker", envconf.String("WRENN_FIRECRACKER", "firecracker"), "firecracker binary (WRENN_FIRECRACKER)")
	lazy := fs.Bool("lazy-memory", envconf.String("WRENN_LAZY_MEMORY", "") == "1", "Firecracker: resume through the UFFD page-fault handler (WRENN_LAZY_MEMORY=1)")
	jailer := fs.String("jailer", envconf.String("WRENN_JAILER", ""), "Firecracker: run each VM under this jailer binary (WRENN_JAILER)")
	jailFirst := fs.Int("jailer-first-id", envInt("WRENN_JAILER_FIRST_ID", firecracker.DefaultJailFirstID), "Firecracker: each jailed VMM runs as a uid and gid of its own, from this one on (WRENN_JAILER_FIRST_ID)")
	jailIDs := fs.Int("jailer-ids", envInt("WRENN_JAILER_IDS", firecracker.DefaultJailIDs), "Firecracker: how many uids/gids from --jailer-first-id jailed VMMs may use (WRENN_JAILER_IDS)")
	jailBase := fs.String("jailer-chroot", envconf.String("WRENN_JAILER_CHROOT", "/srv/jailer"), "Firecracker: the jailer's chroot base directory (WRENN_JAILER_CHROOT)")
	diffSnaps := fs.Bool("diff-snapshots", envconf.String("WRENN_DIFF_SNAPSHOTS", "") == "1", "Firecracker: pausing a resumed sandbox writes only the pages it changed (WRENN_DIFF_SNAPSHOTS=1)")
	diskName := fs.String("disk", envconf.String("WRENN_DISK", "qcow2"), "sandbox disks: qcow2 overlays, copy (sparse copies) or dm (device-mapper snapshots) (WRENN_DISK)")
	dns := fs.String("dns", envconf.String("WRENN_GUEST_DNS", "1.1.1.1,8.8.8.8"), "resolvers for guests, comma-separated (WRENN_GUEST_DNS); reachable on port 53 unless a sandbox denies all egress")
	guestPrivate := fs.String("guest-private-egress", envconf.String("WRENN_GUEST_PRIVATE_EGRESS", ""), "private, CGNAT or other non-public IPv4 ranges guests may reach, comma-separated CIDRs; by default guests reach only the public internet (WRENN_GUEST_PRIVATE_EGRESS)")
	timeout := fs.Duration("default-timeout", 5*time.Minute, "sandbox timeout when a create names none")
	tlsCert := fs.String("tls-cert", envconf.String("WRENN_AGENT_TLS_CERT", ""), "serve RPCs over TLS with this certificate (WRENN_AGENT_TLS_CERT)")
	tlsKey := fs.String("tls-key", envconf.String("WRENN_AGENT_TLS_KEY", ""), "the certificate's key (WRENN_AGENT_TLS_KEY)")
	clientCA := fs.String("tls-client-ca", envconf.String("WRENN_AGENT_TLS_CLIENT_CA", ""), "require client certificates signed by this CA: mutual TLS (WRENN_AGENT_TLS_CLIENT_CA)")
	managedTLS := fs.Bool("managed-tls", envconf.String("WRENN_AGENT_MANAGED_TLS", "") == "1", "at --register, have the control plane's CA (WRENN_AGENT_CA_DIR) certify a key made here and serve mutual TLS with it, renewed at heartbeats (WRENN_AGENT_MANAGED_TLS=1)")
	register := fs.String("register", "", "register this host with the control plane using this one-time token, then serve (the agent moves it off its command line at once; WRENN_REGISTRATION_TOKEN keeps it off altogether)")
	registerEnv := fs.Bool("register-env", false, "register with the token in WRENN_REGISTRATION_TOKEN even when this host has saved credentials, as --register does")
	address := fs.String("address", envconf.String("WRENN_HOST_ADDRESS", ""), "ip:port where the control plane reaches this agent (registration; default: the --listen address) (WRENN_HOST_ADDRESS)")
	cpURL := fs.String("cp-url", envconf.String("WRENN_CP_URL", "http://localhost:8000"), "the control plane's URL, for registration and heartbeats (WRENN_CP_URL)")
	heartbeat := fs.Duration("heartbeat-interval", 30*time.Second, "time between heartbeats to the control plane")
	minFree := fs.Int("min-free-mib", envInt("WRENN_MIN_FREE_MIB", sandbox.DefaultMinFreeMiB), "disk space under --dir that creates, pauses and resumes leave free; they are refused with a clear error rather than fill the disk (WRENN_MIN_FREE_MIB)")
	cgroupParent := fs.String("cgroup-parent", envconf.String("WRENN_CGROUP_PARENT", "wrenn"), "each VMM runs in <cgroup root>/<this>/<sandbox id> with its VM's CPU, memory and process limits; \"off\" runs VMMs without (WRENN_CGROUP_PARENT)")
	overhead := fs.Int("vmm-overhead-mib", envInt("WRENN_VMM_OVERHEAD_MIB", 256), "memory a VMM may use beyond its guest's RAM before its cgroup limit (WRENN_VMM_OVERHEAD_MIB)")
	runAs := fs.String("user", envconf.String("WRENN_USER", ""), "started as root, prepare the host and go on as this user with only CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN (scripts/prepare-wrenn-user.sh creates it) (WRENN_USER)")
	consoleKiB := fs.Int("console-log-kib", envInt("WRENN_CONSOLE_LOG_KIB", 1024), "each sandbox keeps its VMM's output and guest console in vmm.log, rotated at this size with one older file kept (WRENN_CONSOLE_LOG_KIB)")
	consoleRate := fs.Int("console-log-rate-kib", envInt("WRENN_CONSOLE_LOG_RATE_KIB", 64), "console output kept per sandbox and second, in bursts of --console-log-kib; the rest is dropped and counted (WRENN_CONSOLE_LOG_RATE_KIB)")
	warmPools := fs.String("warm-pools", envconf.String("WRENN_WARM_POOLS", ""), "warm pools to keep, as name:size[:vcpus:memory_mib:disk_mib],...: that many sandboxes of the template wait ready and a create that fits takes one (WRENN_WARM_POOLS; the control plane's per-template settings win; make dev: minimal:2,base:1)")
	memTemplates := fs.String("memory-templates", envconf.String("WRENN_MEMORY_TEMPLATES", ""), "templates to give a memory snapshot at start when they have none, as name:vcpus:memory_mib:disk_mib,...: sandboxes of that shape then start from memory instead of booting (WRENN_MEMORY_TEMPLATES; make dev: minimal:1:512:5120,base:2:512:5120,code-runner-beta:1:512:5120, the control plane's default shapes)")
	forkMemory := fs.String("fork-memory-dir", envconf.String("WRENN_FORK_MEMORY_DIR", "/dev/shm"), "QEMU: a tmpfs where a fork keeps the memory it copied while its sandboxes live (filling it costs a fraction of a disk file's page faults); \"off\" keeps it under --dir (WRENN_FORK_MEMORY_DIR)")
	slots := fs.String("slots", envconf.String("WRENN_SLOTS", "1-32767"), "network slots this agent uses, first-last; agents sharing a machine need disjoint ranges (WRENN_SLOTS)")
	logLevel := fs.String("log-level", envconf.String("WRENN_LOG_LEVEL", "info"), "debug, info, warn or error")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if err := errors.Join(envErrs...); err != nil {
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
	if *runAs != "" && *jailer != "" {
		return errors.New("--jailer needs the agent to run as root (the jailer chroots, makes device nodes and changes uid itself); drop --user")
	}
	if *runAs != "" {
		plan := privdrop.Plan{User: *runAs, WrennDir: *dir, Args: os.Args[1:]}
		if *cgroupParent != "off" {
			h, err := detectCgroups(*cgroupParent)
			if err != nil {
				return err
			}
			plan.Cgroups = &h
		}
		if err := privdrop.Become(plan); err != nil {
			return err
		}
	}
	if caps, err := procfs.Status(os.Getpid(), "CapEff"); err == nil {
		log.Info("privileges", "uid", os.Geteuid(), "capabilities", caps)
	}
	if os.Geteuid() == 0 {
		log.Warn("running as root: start with --user wrenn (scripts/prepare-wrenn-user.sh) to keep only the capabilities the agent needs")
	}

	var resolvers []netip.Addr
	for _, s := range strings.Split(*dns, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("--dns: %w", err)
		}
		resolvers = append(resolvers, a)
	}
	var privateEgress []netip.Prefix
	for _, s := range strings.Split(*guestPrivate, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil || !p.Addr().Is4() {
			return fmt.Errorf("--guest-private-egress: %q is not an IPv4 CIDR", s)
		}
		privateEgress = append(privateEgress, p)
	}
	console := vmm.ConsoleLog{MaxBytes: int64(*consoleKiB) << 10, BytesPerSecond: int64(*consoleRate) << 10, Log: log}
	fc := &firecracker.Driver{Binary: *fcBinary, Log: log, LazyMemory: *lazy, DiffSnapshots: *diffSnaps, Console: console}
	if self, err := os.Executable(); err == nil {
		// Each lazily restored VM's memory is served by a process of its
		// own, so an agent restart strands no page fault.
		fc.UFFDHandler = self
	}
	var cgroups sandbox.Cgroups
	var jailGroups *cgroup.VMMs
	if *cgroupParent != "off" {
		vmms, err := vmmCgroups(*cgroupParent, *overhead)
		switch {
		case err == nil:
			fc.Confine, cgroups, jailGroups = vmms, vmms, &vmms
			log.Info("VMMs run in cgroups of their own", "parent", vmms.Dirs["memory"], "cgroup_v2", vmms.V2, "overhead_mib", *overhead)
		case flagGiven(fs, "cgroup-parent", "WRENN_CGROUP_PARENT"):
			return err
		default:
			// The default parent cannot be used (a container without a
			// delegated cgroup, say): say so loudly rather than not start.
			log.Warn("VMMs run WITHOUT cgroup limits: this host's cgroups cannot be used; fix it, or name a usable parent with --cgroup-parent, or silence this with --cgroup-parent off", "error", err)
		}
	} else {
		log.Warn("VMMs run without cgroup limits (--cgroup-parent off)")
	}
	if *jailer != "" {
		if *jailFirst < 1000 || *jailIDs < 1 || *jailFirst+*jailIDs > 1<<31 {
			return fmt.Errorf("--jailer-first-id %d, --jailer-ids %d: want ids from 1000 on, at least one, below 2^31", *jailFirst, *jailIDs)
		}
		fc.Jailer = &firecracker.Jailer{Binary: *jailer, FirstID: *jailFirst, IDs: *jailIDs, ChrootBase: *jailBase, Cgroups: jailGroups}
	}
	driver, accel, err := chooseVMM(*vmmName, fc)
	if err != nil {
		return err
	}
	if driver.Name() == "firecracker" && *lazy {
		if err := fc.CheckLazyMemory(); err != nil {
			return err
		}
	}
	if driver.Name() == "firecracker" && *diskName == "qcow2" {
		// Firecracker reads raw images only: device-mapper snapshots where
		// the host has device-mapper, else sparse copies.
		*diskName = "copy"
		if disk.Available() == nil && *runAs == "" {
			*diskName = "dm"
		}
	}
	if driver.Name() == "firecracker" && *diskName == "dm" && *runAs != "" {
		// The VMM runs as the agent's user without capabilities, and the
		// loop and device-mapper nodes are root's: it could not open its disk.
		return errors.New("--disk dm with --vmm firecracker needs a root agent: under --user the VMM cannot open device-mapper nodes; use --disk copy (the default there) or drop --user")
	}
	disks, err := disk.ForName(*diskName)
	if err != nil {
		return err
	}
	log.Info("VMM chosen", "vmm", driver.Name(), "accelerator", accel, "requested", *vmmName, "disks", disks.Name())

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *managedTLS && (*tlsCert != "" || *clientCA != "") {
		return errors.New("--managed-tls and --tls-cert/--tls-client-ca exclude each other: the control plane's CA or your own")
	}
	creds, token, err := credentials(ctx, *dir, registrationToken(*register, *registerEnv, *dir, log), *cpURL, *address, *listen, driver.Name(), *tlsCert != "", *managedTLS, log)
	if err != nil {
		return err
	}

	slotRange, err := network.ParseSlotRange(*slots)
	if err != nil {
		return err
	}
	memoryTemplates, err := sandbox.ParseMemoryTemplates(*memTemplates)
	if err != nil {
		return fmt.Errorf("--memory-templates: %w", err)
	}
	pools, err := sandbox.ParsePools(*warmPools)
	if err != nil {
		return fmt.Errorf("--warm-pools: %w", err)
	}
	memoryScratch := *forkMemory
	if memoryScratch == "off" || (driver.Name() != "qemu" && !flagGiven(fs, "fork-memory-dir", "WRENN_FORK_MEMORY_DIR")) {
		memoryScratch = "" // Firecracker's jails link template files: they stay on --dir's file system
	}
	mgr := sandbox.New(sandbox.Config{
		WrennDir: *dir, Driver: driver, Disks: disks, Net: &network.Manager{Log: log, Resolvers: resolvers, PrivateAllow: privateEgress}, Log: log,
		DNS: resolvers, DefaultTimeout: *timeout, HostMemoryMiB: int(hostMemoryMiB()), Slots: slotRange,
		MinFreeMiB: *minFree, Cgroups: cgroups, Console: console, WarmPools: pools, MemoryScratch: memoryScratch,
	})
	if err := mgr.Start(ctx); err != nil {
		return err
	}
	go mgr.PrepareMemoryTemplates(ctx, memoryTemplates)

	tlsConfig, err := serverTLS(*tlsCert, *tlsKey, *clientCA)
	if err != nil {
		return err
	}
	managed := creds != nil && creds.ManagedTLS
	if *managedTLS && !managed {
		return errors.New("--managed-tls: this host was registered without it; register it again with --register <token> --managed-tls")
	}
	if managed {
		if tlsConfig != nil {
			return errors.New("this host was registered with --managed-tls: drop --tls-cert/--tls-key")
		}
		if tlsConfig, err = creds.ServerTLS(); err != nil {
			return err
		}
		log.Info("serving mutual TLS with the certificate the control plane signed", "expires", creds.CertificateExpiry().Format(time.RFC3339))
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
	cfg := server.Config{
		Manager: mgr, Token: token, Log: log, WrennDir: *dir,
		VMM: driver.Name(), Accel: accel, Version: version.Version,
	}
	if creds != nil {
		cfg.Tokens = creds.Tokens
		go creds.Run(ctx, *heartbeat, log)
	}
	hs := &http.Server{
		Handler:           server.Handler(ctx, cfg),
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute, // streams keep their connection busy, not idle
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	log.Info("wrenn-agent listening", "addr", ln.Addr().String(), "tls", tlsConfig != nil, "mutual_tls", *clientCA != "" || managed, "dir", *dir, "version", version.Version, "sandboxes", len(mgr.List()))
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	// The VMs keep running: the next agent start re-adopts them.
	log.Info("wrenn-agent stopping; sandboxes keep running")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return hs.Shutdown(shutdownCtx)
}

// chooseVMM picks the driver: Firecracker needs a working KVM and its
// binary; QEMU runs anywhere (TCG without KVM). auto prefers Firecracker.
func chooseVMM(name string, fc *firecracker.Driver) (vmm.Driver, string, error) {
	fcPath, fcErr := exec.LookPath(fc.Binary)
	fc.Binary = fcPath
	fcReady := kvm.Usable() && fcErr == nil
	switch name {
	case "auto":
		if fcReady {
			return fc, "kvm", nil
		}
	case "qemu":
	case "firecracker":
		if !kvm.Usable() {
			return nil, "", errors.New("--vmm firecracker: no usable KVM on this host (needs /dev/kvm and a CPU with vmx or svm); use qemu")
		}
		if fcErr != nil {
			return nil, "", fmt.Errorf("--vmm firecracker: %w", fcErr)
		}
		return fc, "kvm", nil
	default:
		return nil, "", fmt.Errorf("--vmm %q: use auto, qemu or firecracker", name)
	}
	q := qemu.New(fc.Log)
	q.Confine, q.Console = fc.Confine, fc.Console
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

// credentials decides how the control plane authenticates to this agent:
// a fixed WRENN_HOST_TOKEN (no registration, no heartbeats), a new
// registration (--register), or the credentials saved by an earlier one.
// With TLS the control plane is told to call https://<address>.
// registrationToken is the token to register with now: --register's, or
// WRENN_REGISTRATION_TOKEN's when --register-env says so or the host has
// no saved credentials yet. A token left in the environment of a host
// that registered already is ignored (it was spent), not used again.
func registrationToken(flag string, fromEnv bool, dir string, log *slog.Logger) string {
	if flag != "" {
		return flag
	}
	env := os.Getenv("WRENN_REGISTRATION_TOKEN")
	if env == "" || fromEnv {
		return env
	}
	if _, err := registration.Load(dir); err == nil {
		log.Warn("ignoring WRENN_REGISTRATION_TOKEN: this host is registered already; remove it from the agent's environment")
		return ""
	}
	return env
}

func credentials(ctx context.Context, dir, registerToken, cpURL, address, listen, vmmName string, useTLS, managedTLS bool, log *slog.Logger) (*registration.Credentials, string, error) {
	// The VMMs this agent starts inherit its environment: tokens leave it.
	fixed := os.Getenv("WRENN_HOST_TOKEN")
	_ = os.Unsetenv("WRENN_HOST_TOKEN")
	_ = os.Unsetenv("WRENN_REGISTRATION_TOKEN")
	if t := fixed; t != "" && registerToken == "" {
		if len(t) < 16 {
			return nil, "", errors.New("WRENN_HOST_TOKEN is shorter than 16 characters")
		}
		log.Info("using the fixed host token from WRENN_HOST_TOKEN (no registration, no heartbeats)")
		return nil, t, nil
	}
	if registerToken != "" {
		if address == "" {
			address = listen
		}
		host, port, err := net.SplitHostPort(address)
		if err != nil {
			return nil, "", fmt.Errorf("--address %q: %w", address, err)
		}
		if host == "" || host == "0.0.0.0" || host == "::" {
			return nil, "", fmt.Errorf("--address %q: give the IP the control plane reaches this host on (e.g. 10.0.0.5:%s)", address, port)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, "", err
		}
		if useTLS || managedTLS {
			address = "https://" + address
		}
		c, err := registration.Register(ctx, dir, cpURL, registerToken, hostSpecs(dir, address, vmmName), managedTLS)
		if err != nil {
			return nil, "", err
		}
		log.Info("host registered with the control plane", "host", c.HostID, "control_plane", cpURL, "address", address)
		tok, _ := c.Tokens()
		return c, tok, nil
	}
	c, err := registration.Load(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, "", fmt.Errorf("this host is not registered: run wrenn-agent --register <token> --address <ip:port> (token from POST /v1/hosts), or set WRENN_HOST_TOKEN")
		}
		return nil, "", err
	}
	log.Info("loaded host credentials", "host", c.HostID, "control_plane", c.CPURL)
	tok, _ := c.Tokens()
	return c, tok, nil
}

func hostSpecs(dir, address, vmmName string) registration.Specs {
	arch := runtime.GOARCH
	switch arch {
	case "amd64":
		arch = "x86_64"
	case "arm64":
		arch = "aarch64"
	}
	s := registration.Specs{Arch: arch, CPUCores: int32(runtime.NumCPU()), Address: address, VMM: vmmName, Version: version.Version}
	if mem, err := procfs.Mem("MemTotal"); err == nil {
		s.MemoryMB = int32(mem >> 20)
	}
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) == nil {
		s.DiskGB = int32(int64(st.Blocks) * st.Bsize >> 30)
	}
	return s
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

// detectCgroups finds this host's cgroup layout with the VMMs' parent.
func detectCgroups(parent string) (cgroup.Hierarchy, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return cgroup.Hierarchy{}, err
	}
	defer f.Close()
	h, err := cgroup.Detect(f, parent)
	if err != nil {
		return cgroup.Hierarchy{}, fmt.Errorf("--cgroup-parent: %w (or run VMMs without limits: --cgroup-parent off)", err)
	}
	return h, nil
}

// vmmCgroups prepares the parent group the VMMs' groups are made in.
func vmmCgroups(parent string, overheadMiB int) (cgroup.VMMs, error) {
	h, err := detectCgroups(parent)
	if err != nil {
		return cgroup.VMMs{}, err
	}
	if err := h.Prepare(); err != nil {
		return cgroup.VMMs{}, fmt.Errorf("--cgroup-parent: %w (an unprivileged agent needs scripts/prepare-wrenn-user.sh; or --cgroup-parent off)", err)
	}
	return cgroup.VMMs{Hierarchy: h, OverheadMiB: overheadMiB}, nil
}

// flagGiven reports whether the operator chose a setting, on the command
// line or in the environment, rather than leaving the default.
func flagGiven(fs *flag.FlagSet, name, env string) bool {
	given := os.Getenv(env) != ""
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}
