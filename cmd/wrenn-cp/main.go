// Command wrenn-cp is the control plane: the public API, accounts, hosts,
// scheduling and reconciliation. It keeps no state of its own: everything
// durable is in PostgreSQL, so several replicas can serve together.
//
//	wrenn-cp [serve]                              run the API (default)
//	wrenn-cp migrate                              apply migrations and exit
//	wrenn-cp admin create --email E --password P  create a platform admin
//	wrenn-cp keygen                               print a new WRENN_ENCRYPTION_KEY
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/agentca"
	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/api"
	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/builder"
	"github.com/wrenn/wrenn/internal/controlplane/hostaddr"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/mail"
	"github.com/wrenn/wrenn/internal/controlplane/notify"
	"github.com/wrenn/wrenn/internal/controlplane/oauthlogin"
	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
	"github.com/wrenn/wrenn/internal/controlplane/seal"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	"github.com/wrenn/wrenn/internal/controlplane/web"
	"github.com/wrenn/wrenn/internal/envconf"
	"github.com/wrenn/wrenn/internal/version"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "wrenn-cp:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	cmd := "serve"
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve", "migrate":
		return serve(cmd, args)
	case "admin":
		if len(args) == 0 || (args[0] != "create" && args[0] != "reset-password") {
			return errors.New("usage: wrenn-cp admin create --email EMAIL --password PASSWORD [--name NAME]\n" +
				"       wrenn-cp admin reset-password --email EMAIL --password PASSWORD")
		}
		return admin(args[0], args[1:])
	case "version":
		fmt.Println(version.Version)
		return nil
	case "keygen":
		fmt.Println(seal.Generate())
		return nil
	default:
		return fmt.Errorf("unknown command %q: use serve, migrate, admin create, admin reset-password, keygen or version", cmd)
	}
}

func logger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("WRENN_LOG_LEVEL: %w", err)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

// openStore connects (waiting up to a minute for the database), migrates,
// and gives the store the keyring that seals its secrets.
func openStore(ctx context.Context, log *slog.Logger) (*store.Store, error) {
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		return nil, errors.New("DATABASE_URL is not set (for a local database: scripts/postgres.sh start && export DATABASE_URL=$(scripts/postgres.sh url))")
	}
	keys, err := keyring()
	if err != nil {
		return nil, err
	}
	st, err := store.Open(ctx, url, time.Minute, log)
	if err != nil {
		return nil, err
	}
	st.Secrets = keys
	return st, nil
}

// keyring reads the key that seals the database's secrets:
// WRENN_ENCRYPTION_KEY, or the file WRENN_ENCRYPTION_KEY_FILE names, and
// the keys of earlier rotations in WRENN_ENCRYPTION_OLD_KEYS. There is no
// default: a control plane without a key does not start.
func keyring() (*seal.Keyring, error) {
	key := os.Getenv("WRENN_ENCRYPTION_KEY")
	if f := os.Getenv("WRENN_ENCRYPTION_KEY_FILE"); f != "" {
		if key != "" {
			return nil, errors.New("set WRENN_ENCRYPTION_KEY or WRENN_ENCRYPTION_KEY_FILE, not both")
		}
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("WRENN_ENCRYPTION_KEY_FILE: %w", err)
		}
		key = string(data)
	}
	if strings.TrimSpace(key) == "" {
		return nil, errors.New("no encryption key: the control plane seals the secrets it keeps in the database (JWT signing secret, host tokens, channel credentials) " +
			"with WRENN_ENCRYPTION_KEY or the file WRENN_ENCRYPTION_KEY_FILE names; make one with `wrenn-cp keygen` and keep it apart from the database (make dev makes one in .dev/)")
	}
	return seal.New(key, strings.Split(os.Getenv("WRENN_ENCRYPTION_OLD_KEYS"), ",")...)
}

// signer uses WRENN_JWT_SECRET, or else a secret generated once and kept
// in the database, so every replica signs and verifies alike.
func signer(ctx context.Context, st *store.Store) (*auth.Signer, error) {
	secret := envconf.String("WRENN_JWT_SECRET", os.Getenv("JWT_SECRET")) // JWT_SECRET: upstream's name
	if secret == "" {
		var err error
		secret, err = st.Setting(ctx, "jwt_secret", ids.Random(32))
		if err != nil {
			return nil, err
		}
	}
	if len(secret) < 32 {
		return nil, errors.New("WRENN_JWT_SECRET must be at least 32 characters")
	}
	ttl, err := envconf.Duration("WRENN_JWT_TTL", auth.UserTokenTTL)
	if err != nil {
		return nil, err
	}
	return &auth.Signer{Secret: []byte(secret), UserTTL: ttl}, nil
}

func serve(cmd string, args []string) error {
	fs := flag.NewFlagSet("wrenn-cp", flag.ContinueOnError)
	listen := fs.String("listen", envconf.String("WRENN_CP_LISTEN_ADDR", ":8000"), "address of the API (WRENN_CP_LISTEN_ADDR)")
	logLevel := fs.String("log-level", envconf.String("WRENN_LOG_LEVEL", "info"), "debug, info, warn or error (WRENN_LOG_LEVEL)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	log, err := logger(*logLevel)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	st, err := openStore(ctx, log)
	if err != nil {
		return err
	}
	defer st.Close()
	// Secrets stored in the clear (before sealing) or with an older key
	// are sealed with the current one; one the keys cannot open stops here.
	n, err := st.ResealSecrets(ctx)
	if err != nil {
		return err
	}
	if n > 0 {
		log.Info("sealed secrets with the current encryption key", "count", n)
	}
	if cmd == "migrate" {
		log.Info("database schema is up to date")
		return nil
	}
	sg, err := signer(ctx, st)
	if err != nil {
		return err
	}
	interval, err := envconf.Duration("WRENN_RECONCILE_INTERVAL", 10*time.Second)
	if err != nil {
		return err
	}
	silence, err := envconf.Duration("WRENN_HOST_SILENCE", 90*time.Second)
	if err != nil {
		return err
	}
	allowPrivate, err := envconf.Bool("WRENN_NOTIFY_ALLOW_PRIVATE", false)
	if err != nil {
		return err
	}
	notifyClient := notify.NewClient(allowPrivate)
	var mailer mail.Sender
	if v := envconf.String("WRENN_SMTP_URL", upstreamSMTPURL()); v != "" {
		m, err := mail.Parse(v)
		if err != nil {
			return fmt.Errorf("WRENN_SMTP_URL: %w", err)
		}
		mailer = m
		log.Info("account mail enabled: signups need activation", "smtp", m.Addr, "from", m.From)
	} else {
		log.Info("WRENN_SMTP_URL is unset: signups are active at once and password reset by mail is off")
	}
	agentTLS, err := agentclient.TLSConfig(os.Getenv("WRENN_AGENT_CA"), os.Getenv("WRENN_AGENT_CLIENT_CERT"), os.Getenv("WRENN_AGENT_CLIENT_KEY"))
	if err != nil {
		return err
	}
	var ca *agentca.CA
	if dir := os.Getenv("WRENN_AGENT_CA_DIR"); dir != "" {
		if agentTLS != nil {
			return errors.New("WRENN_AGENT_CA_DIR (a CA this control plane runs) and WRENN_AGENT_CA/WRENN_AGENT_CLIENT_CERT (your own) exclude each other")
		}
		if ca, err = agentca.Open(dir); err != nil {
			return err
		}
		agentTLS = ca.ClientTLS()
		log.Info("running the agent CA: agents started with --managed-tls get certificates at registration", "dir", dir)
	}
	allow, err := hostaddr.ParseAllow(os.Getenv("WRENN_HOST_ADDRESS_ALLOW"))
	if err != nil {
		return fmt.Errorf("WRENN_HOST_ADDRESS_ALLOW: %w", err)
	}
	addresses := hostaddr.Policy{Allow: allow, Own: hostaddr.LocalAddrs()}
	proxies, err := hostaddr.ParseAllow(os.Getenv("WRENN_TRUSTED_PROXIES"))
	if err != nil {
		return fmt.Errorf("WRENN_TRUSTED_PROXIES: %w", err)
	}
	authRate, err := envconf.Int("WRENN_AUTH_RATE_PER_MINUTE", 30)
	if err != nil {
		return err
	}
	signups, err := envconf.Int("WRENN_SIGNUPS_PER_HOUR", 10)
	if err != nil {
		return err
	}
	quotas, err := teamQuotas()
	if err != nil {
		return err
	}
	ing, err := ingressConfig(*listen)
	if err != nil {
		return err
	}
	e2bVCPUs, err := envconf.Int("WRENN_E2B_VCPUS", 2)
	if err != nil {
		return err
	}
	e2bMemory, err := envconf.Int("WRENN_E2B_MEMORY_MB", 512)
	if err != nil {
		return err
	}
	defaultDisk, err := envconf.Int("WRENN_DEFAULT_DISK_MB", 5120)
	if err != nil {
		return err
	}
	maxDisk, err := envconf.Int("WRENN_MAX_DISK_MB", 512<<10)
	if err != nil {
		return err
	}
	if defaultDisk < 256 || maxDisk < defaultDisk {
		return fmt.Errorf("WRENN_DEFAULT_DISK_MB must be at least 256 and no more than WRENN_MAX_DISK_MB")
	}
	providers, err := oauthProviders(log)
	if err != nil {
		return err
	}
	grace, err := envconf.Duration("WRENN_ACCOUNT_GRACE", 15*24*time.Hour)
	if err != nil {
		return err
	}
	agents := &agentclient.Pool{TLS: agentTLS, HostIdentity: ca != nil}
	srv := api.New(api.Config{Store: st, Signer: sg, Agents: agents, Log: log, NotifyClient: notifyClient,
		Mailer: mailer, PublicURL: publicURL(), Dashboard: web.Handler(), AgentCA: ca, HostAddresses: addresses,
		TrustedProxies: proxies, PublicPerMinute: float64(authRate), SignupsPerHour: float64(signups), Quotas: quotas,
		IngressDomain: ing.domain, IngressScheme: ing.scheme, E2BVCPUs: e2bVCPUs, E2BMemoryMB: e2bMemory,
		DefaultDiskMB: defaultDisk, MaxDiskMB: maxDisk, OAuth: providers})
	defer srv.Close()
	rec := &reconciler.Reconciler{Store: st, Agents: agents, Actions: srv, Log: log, Interval: interval, HostSilence: silence, HostAddresses: addresses, AccountGrace: grace}
	go rec.Run(ctx)
	disp := &notify.Dispatcher{Store: st, Client: notifyClient, Log: log}
	go disp.Run(ctx, srv.EventsChanged)
	bld := &builder.Builder{Store: st, Capsules: srv, Log: log}
	go bld.Run(ctx)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	hs := srv.HTTPServer()
	errc := make(chan error, 2)
	go func() { errc <- hs.Serve(ln) }()
	var is *http.Server
	if ing.listen != "" {
		iln, err := net.Listen("tcp", ing.listen)
		if err != nil {
			return fmt.Errorf("ingress listen: %w", err)
		}
		is = srv.IngressServer()
		if ing.tls != nil {
			is.TLSConfig = ing.tls
			iln = tls.NewListener(iln, ing.tls)
		}
		go func() { errc <- is.Serve(iln) }()
		log.Info("sandbox ingress listening", "addr", iln.Addr().String(), "tls", ing.tls != nil)
	}
	log.Info("wrenn-cp listening", "addr", ln.Addr().String(), "version", version.Version, "reconcile_interval", interval, "host_silence", silence,
		"sandbox_urls", ing.scheme+"://<port>-<capsule id>."+ing.domain)
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("wrenn-cp stopping")
	sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if is != nil {
		_ = is.Shutdown(sctx)
	}
	return hs.Shutdown(sctx)
}

// publicURL is WRENN_PUBLIC_URL, or upstream's CP_PUBLIC_URL.
func publicURL() string {
	return envconf.String("WRENN_PUBLIC_URL", os.Getenv("CP_PUBLIC_URL"))
}

// upstreamSMTPURL is upstream Wrenn's SMTP_HOST, SMTP_PORT,
// SMTP_USERNAME, SMTP_PASSWORD and SMTP_FROM_EMAIL as one WRENN_SMTP_URL
// ("" without SMTP_HOST). Port 465 is TLS from the start, as upstream.
func upstreamSMTPURL() string {
	host := os.Getenv("SMTP_HOST")
	if host == "" {
		return ""
	}
	port := envconf.String("SMTP_PORT", "587")
	u := url.URL{Scheme: "smtp", Host: net.JoinHostPort(host, port),
		RawQuery: url.Values{"from": {envconf.String("SMTP_FROM_EMAIL", "noreply@wrenn.dev")}}.Encode()}
	if port == "465" {
		u.Scheme = "smtps"
	}
	if user := os.Getenv("SMTP_USERNAME"); user != "" {
		u.User = url.UserPassword(user, os.Getenv("SMTP_PASSWORD"))
	}
	return u.String()
}

// oauthProviders are the sign-in providers configured: GitHub with
// WRENN_GITHUB_CLIENT_ID and WRENN_GITHUB_CLIENT_SECRET (upstream's
// OAUTH_GITHUB_CLIENT_ID/SECRET also work), and WRENN_GITHUB_URL and
// WRENN_GITHUB_API_URL for GitHub Enterprise Server. The callback is
// WRENN_PUBLIC_URL/auth/oauth/github/callback, so that must be set.
func oauthProviders(log *slog.Logger) (map[string]oauthlogin.Provider, error) {
	id := envconf.String("WRENN_GITHUB_CLIENT_ID", os.Getenv("OAUTH_GITHUB_CLIENT_ID"))
	secret := envconf.String("WRENN_GITHUB_CLIENT_SECRET", os.Getenv("OAUTH_GITHUB_CLIENT_SECRET"))
	if id == "" && secret == "" {
		return nil, nil
	}
	if id == "" || secret == "" {
		return nil, errors.New("sign-in with GitHub needs both WRENN_GITHUB_CLIENT_ID and WRENN_GITHUB_CLIENT_SECRET")
	}
	pub := strings.TrimRight(publicURL(), "/")
	if u, err := url.Parse(pub); pub == "" || err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, errors.New("sign-in with GitHub needs WRENN_PUBLIC_URL (https://wrenn.example.com): GitHub sends users back to <it>/auth/oauth/github/callback")
	}
	gh := oauthlogin.NewGitHub(oauthlogin.GitHubConfig{ClientID: id, ClientSecret: secret, CallbackURL: pub + "/auth/oauth/github/callback",
		WebURL: os.Getenv("WRENN_GITHUB_URL"), APIURL: os.Getenv("WRENN_GITHUB_API_URL")})
	log.Info("sign-in with GitHub enabled", "callback", pub+"/auth/oauth/github/callback")
	return map[string]oauthlogin.Provider{gh.Name(): gh}, nil
}

// ingressSettings say where sandbox ports are served and how their URLs read.
type ingressSettings struct {
	domain, scheme string
	listen         string      // a listener for the ingress alone ("": none)
	tls            *tls.Config // on that listener
}

// ingressConfig reads WRENN_INGRESS_*: the domain under which
// <port>-<capsule id>.<domain> names reach this control plane (by default
// WRENN_PUBLIC_URL's host, else localhost and the port of the ingress's
// listener or the API's), and an
// optional listener of its own, with TLS for a wildcard certificate.
func ingressConfig(apiListen string) (ingressSettings, error) {
	s := ingressSettings{domain: os.Getenv("WRENN_INGRESS_DOMAIN"), scheme: "http", listen: os.Getenv("WRENN_INGRESS_LISTEN_ADDR")}
	if pub := publicURL(); pub != "" {
		u, err := url.Parse(pub)
		if err != nil || u.Host == "" {
			return s, fmt.Errorf("WRENN_PUBLIC_URL %q is not a URL", pub)
		}
		if s.domain == "" {
			s.domain = u.Host
		}
		if u.Scheme == "https" {
			s.scheme = "https"
		}
	}
	if s.domain == "" {
		addr := apiListen
		if s.listen != "" {
			addr = s.listen
		}
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return s, fmt.Errorf("listen address %q: %w", addr, err)
		}
		s.domain = net.JoinHostPort("localhost", port)
	}
	if strings.ContainsAny(s.domain, "/ ") || strings.HasPrefix(s.domain, ".") {
		return s, fmt.Errorf("WRENN_INGRESS_DOMAIN %q must be a host name, such as sandboxes.example.com", s.domain)
	}
	cert, key := os.Getenv("WRENN_INGRESS_TLS_CERT"), os.Getenv("WRENN_INGRESS_TLS_KEY")
	if (cert == "") != (key == "") {
		return s, errors.New("WRENN_INGRESS_TLS_CERT and WRENN_INGRESS_TLS_KEY go together")
	}
	if cert != "" {
		if s.listen == "" {
			return s, errors.New("WRENN_INGRESS_TLS_CERT needs WRENN_INGRESS_LISTEN_ADDR: TLS is served on the ingress's own listener")
		}
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return s, fmt.Errorf("ingress TLS certificate: %w", err)
		}
		s.tls = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
		s.scheme = "https"
	}
	return s, nil
}

// teamQuotas reads the platform's default limits per team (0: none).
func teamQuotas() (store.Quota, error) {
	var q store.Quota
	for _, v := range []struct {
		key string
		def int
		out *int64
	}{
		{"WRENN_TEAM_MAX_CAPSULES", 50, &q.Capsules}, {"WRENN_TEAM_MAX_VCPUS", 64, &q.VCPUs},
		{"WRENN_TEAM_MAX_MEMORY_MB", 128 << 10, &q.MemoryMB}, {"WRENN_TEAM_MAX_DISK_MB", 1 << 20, &q.DiskMB},
	} {
		n, err := envconf.Int(v.key, v.def)
		if err != nil {
			return q, err
		}
		if n < 0 {
			return q, fmt.Errorf("%s must not be negative (0: no limit)", v.key)
		}
		*v.out = int64(n)
	}
	return q, nil
}

// admin runs "admin create" (a platform admin account) or "admin
// reset-password" (a new password, for installs that send no mail).
func admin(sub string, args []string) error {
	fs := flag.NewFlagSet("wrenn-cp admin "+sub, flag.ContinueOnError)
	email := fs.String("email", "", "the account's email")
	password := fs.String("password", os.Getenv("WRENN_ADMIN_PASSWORD"), "the password (or WRENN_ADMIN_PASSWORD)")
	name := fs.String("name", "", "display name (create)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log, err := logger(envconf.String("WRENN_LOG_LEVEL", "warn"))
	if err != nil {
		return err
	}
	ctx := context.Background()
	st, err := openStore(ctx, log)
	if err != nil {
		return err
	}
	defer st.Close()
	sg, err := signer(ctx, st)
	if err != nil {
		return err
	}
	srv := api.New(api.Config{Store: st, Signer: sg, Agents: &agentclient.Pool{}, Log: log})
	defer srv.Close()
	if sub == "reset-password" {
		u, err := srv.ResetPassword(ctx, *email, *password)
		if err != nil {
			return err
		}
		fmt.Printf("set a new password for %s (%s)\n", u.Email, u.ID)
		return nil
	}
	u, err := srv.CreateAdmin(ctx, *email, *password, *name)
	if err != nil {
		return err
	}
	fmt.Printf("created platform admin %s (%s)\n", u.Email, u.ID)
	return nil
}
