// Package server assembles envd: the Connect services, the plain HTTP
// endpoints, and the middleware that authenticates every request and
// decides which user it acts as.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/envd/files"
	"github.com/wrenn/wrenn/internal/envd/filesystem"
	"github.com/wrenn/wrenn/internal/envd/httperr"
	"github.com/wrenn/wrenn/internal/envd/identity"
	"github.com/wrenn/wrenn/internal/envd/metrics"
	"github.com/wrenn/wrenn/internal/envd/ports"
	"github.com/wrenn/wrenn/internal/envd/process"
	"github.com/wrenn/wrenn/internal/envd/session"
	"github.com/wrenn/wrenn/internal/envd/signature"
	"github.com/wrenn/wrenn/proto/envd/filesystem/filesystemconnect"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

// AccessTokenHeader carries the token set through /init.
const AccessTokenHeader = "X-Access-Token"

// maxRPCMessage bounds one Connect message; file data goes through /files.
const maxRPCMessage = 16 << 20

// Config chooses how envd behaves.
type Config struct {
	Log     *slog.Logger
	Version string
	// FallbackUser acts for requests that name no user when /init set no
	// default: "user" in a VM, the developer's own account with --dev.
	FallbackUser string
	// SetClock lets /init set the system clock, host name and random seed;
	// never on a developer machine.
	SetClock bool
	// DiskPath is the file system /metrics reports on.
	DiskPath string
	// AccessToken, when set, is required from the first request on; /init
	// may change it. Without it envd takes its token from the first /init.
	AccessToken string
	// Port is envd's own port, left out of GET /ports.
	Port uint16
	// Forwarder, when set, is the loopback port forwarder GET /ports reports on.
	Forwarder *ports.Forwarder
	// IdentityDir, when set, is where /init writes the sandbox's identity
	// (.WRENN_SANDBOX_ID, .WRENN_TEMPLATE_ID) for programs that read files,
	// not the environment.
	IdentityDir string
}

// Server is a configured envd.
type Server struct {
	cfg        Config
	log        *slog.Logger
	defaults   *session.Defaults
	processes  *process.Service
	filesystem *filesystem.Service
	sampler    *metrics.Sampler
	handler    http.Handler
}

// New builds envd's handler.
func New(cfg Config) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.DiskPath == "" {
		cfg.DiskPath = "/"
	}
	s := &Server{
		cfg:        cfg,
		log:        cfg.Log,
		defaults:   &session.Defaults{},
		filesystem: filesystem.NewService(cfg.Log),
		sampler:    metrics.NewSampler(cfg.DiskPath),
	}
	s.processes = process.NewService(cfg.Log, s.defaults)
	if cfg.AccessToken != "" {
		s.defaults.Apply(session.Update{Token: &cfg.AccessToken})
	}

	opts := []connect.HandlerOption{
		connect.WithReadMaxBytes(maxRPCMessage),
		connect.WithRecover(func(_ context.Context, spec connect.Spec, _ http.Header, p any) error {
			s.log.Error("panic in RPC handler", "procedure", spec.Procedure, "panic", p)
			return connect.NewError(connect.CodeInternal, errors.New("internal error"))
		}),
	}
	mux := http.NewServeMux()
	mux.Handle(processconnect.NewProcessHandler(s.processes, opts...))
	mux.Handle(filesystemconnect.NewFilesystemHandler(s.filesystem, opts...))
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("GET /metrics", s.metrics)
	mux.HandleFunc("GET /envs", s.envs)
	mux.HandleFunc("GET /ports", s.ports)
	mux.HandleFunc("POST /init", s.init)
	mux.HandleFunc("POST /snapshot/prepare", s.prepareSnapshot)
	mux.Handle("/files", &files.Handler{Log: cfg.Log})
	s.handler = s.authenticate(mux)
	return s
}

// Handler serves every envd endpoint.
func (s *Server) Handler() http.Handler { return s.handler }

// Shutdown ends every process and watcher envd started.
func (s *Server) Shutdown() {
	s.processes.Shutdown()
	s.filesystem.Shutdown()
}

// authenticate checks the access token and resolves the acting user.
// /health stays open so the host can tell when envd is up.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			next.ServeHTTP(w, r)
			return
		}
		name, err := requestedUser(r)
		if err != nil {
			s.deny(w, r, http.StatusUnauthorized, connect.CodeUnauthenticated, err.Error())
			return
		}
		presented := r.Header.Get(AccessTokenHeader)
		if presented == "" && r.URL.Path == "/files" && r.Method != http.MethodDelete {
			// A signed URL (the SDKs' uploadUrl/downloadUrl) stands in for the token.
			q := r.URL.Query()
			op := signature.Read
			if r.Method == http.MethodPost {
				op = signature.Write
			}
			if err := s.defaults.CheckWithToken(func(token string) error {
				return signature.Check(q.Get("signature"), q.Get("signature_expiration"), q.Get("path"), op, q.Get("username"), token, time.Now())
			}); err != nil {
				s.deny(w, r, http.StatusUnauthorized, connect.CodeUnauthenticated, err.Error())
				return
			}
		} else if !s.defaults.TokenMatches(presented) {
			s.deny(w, r, http.StatusUnauthorized, connect.CodeUnauthenticated, "missing or invalid "+AccessTokenHeader)
			return
		}
		if name == "" {
			name = s.defaults.User()
		}
		if name == "" {
			name = s.cfg.FallbackUser
		}
		u, err := identity.Lookup(name)
		if err != nil {
			s.deny(w, r, http.StatusUnauthorized, connect.CodeUnauthenticated, err.Error())
			return
		}
		next.ServeHTTP(w, r.WithContext(session.WithUser(r.Context(), u)))
	})
}

// requestedUser reads the user a request names: the username query
// parameter (used by /files), else HTTP Basic auth's user name, as the
// E2B SDKs send it.
func requestedUser(r *http.Request) (string, error) {
	if name := r.URL.Query().Get("username"); name != "" {
		return name, nil
	}
	if r.Header.Get("Authorization") == "" {
		return "", nil
	}
	name, _, ok := r.BasicAuth()
	if !ok {
		return "", errors.New("the Authorization header must be HTTP Basic with the user name")
	}
	return name, nil
}

// deny answers in the caller's protocol: a Connect error for RPCs, the
// envd JSON error otherwise.
func (s *Server) deny(w http.ResponseWriter, r *http.Request, status int, code connect.Code, msg string) {
	s.log.Warn("request denied", "path", r.URL.Path, "remote", r.RemoteAddr, "reason", msg)
	// The path decides, not ErrorWriter.IsSupported: that also claims plain
	// GETs (Connect's GET protocol), and /files clients expect envd's JSON.
	if strings.HasPrefix(r.URL.Path, "/"+processconnect.ProcessName+"/") || strings.HasPrefix(r.URL.Path, "/"+filesystemconnect.FilesystemName+"/") {
		_ = connect.NewErrorWriter().Write(w, r, connect.NewError(code, errors.New(msg)))
		return
	}
	httperr.Write(w, status, msg)
}

// initRequest is the body of POST /init (field names per the envd protocol).
type initRequest struct {
	EnvVars        map[string]string `json:"envVars"`
	AccessToken    *string           `json:"accessToken"`
	Timestamp      *time.Time        `json:"timestamp"`
	DefaultUser    *string           `json:"defaultUser"`
	DefaultWorkdir *string           `json:"defaultWorkdir"`
	// Wrenn's own: what a sandbox started from a memory template needs to
	// become itself (its host name, fresh kernel randomness).
	Hostname *string `json:"hostname"`
	Entropy  []byte  `json:"entropy"` // base64 in JSON
}

func (s *Server) init(w http.ResponseWriter, r *http.Request) {
	var req initRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) { // an empty body changes nothing
		httperr.Write(w, http.StatusBadRequest, "invalid /init body: "+err.Error())
		return
	}
	for k := range req.EnvVars {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			httperr.Write(w, http.StatusBadRequest, fmt.Sprintf("invalid environment variable name %q", k))
			return
		}
	}
	if req.DefaultUser != nil && *req.DefaultUser != "" {
		if _, err := identity.Lookup(*req.DefaultUser); err != nil {
			httperr.Write(w, http.StatusBadRequest, "defaultUser: "+err.Error())
			return
		}
	}
	if req.DefaultWorkdir != nil && *req.DefaultWorkdir != "" && !filepath.IsAbs(*req.DefaultWorkdir) {
		httperr.Write(w, http.StatusBadRequest, "defaultWorkdir must be an absolute path")
		return
	}
	if req.Hostname != nil && !validHostname.MatchString(*req.Hostname) {
		httperr.Write(w, http.StatusBadRequest, fmt.Sprintf("hostname %q is not a valid host name", *req.Hostname))
		return
	}
	if len(req.Entropy) > maxEntropy {
		httperr.Write(w, http.StatusBadRequest, fmt.Sprintf("entropy: at most %d bytes", maxEntropy))
		return
	}
	if s.cfg.SetClock {
		// Randomness first: nothing below, nor any program started after
		// this answer, may draw from the template's random state.
		if len(req.Entropy) > 0 {
			if err := addEntropy(req.Entropy); err != nil {
				httperr.Write(w, http.StatusInternalServerError, err.Error())
				return
			}
		}
		if req.Hostname != nil {
			if err := setHostname(*req.Hostname); err != nil {
				httperr.Write(w, http.StatusInternalServerError, err.Error())
				return
			}
		}
		if req.Timestamp != nil {
			s.syncClock(*req.Timestamp)
		}
	}
	s.defaults.Apply(session.Update{Env: req.EnvVars, Token: req.AccessToken, User: req.DefaultUser, Workdir: req.DefaultWorkdir})
	s.writeIdentity(req.EnvVars)
	s.log.Info("initialised", "env_vars", len(req.EnvVars), "token_set", s.defaults.TokenSet(), "default_user", s.defaults.User())
	w.WriteHeader(http.StatusNoContent)
}

// syncClock sets the guest clock from the host's when they drift apart,
// as happens after a snapshot is resumed.
func (s *Server) syncClock(host time.Time) {
	drift := time.Since(host)
	if drift < 0 {
		drift = -drift
	}
	if drift < 50*time.Millisecond {
		return
	}
	ts := unix.NsecToTimespec(host.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		s.log.Warn("could not set the clock from the host", "error", err, "drift", drift)
		return
	}
	s.log.Info("clock set from the host", "drift", drift)
}

func (s *Server) envs(w http.ResponseWriter, _ *http.Request) {
	env := s.defaults.Env()
	if env == nil {
		env = map[string]string{}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(env)
}

// identityVars are the variables naming the sandbox that /init also
// writes to files, each as IdentityDir/.<NAME> (upstream Wrenn's layout).
var identityVars = []string{"WRENN_SANDBOX", "WRENN_SANDBOX_ID", "WRENN_TEMPLATE_ID"}

// writeIdentity keeps the sandbox's identity in files too: a daemon
// started before /init, or one that clears its environment, still finds it.
func (s *Server) writeIdentity(env map[string]string) {
	if s.cfg.IdentityDir == "" {
		return
	}
	for _, key := range identityVars {
		v, ok := env[key]
		if !ok {
			continue
		}
		if err := os.MkdirAll(s.cfg.IdentityDir, 0o755); err != nil {
			s.log.Warn("cannot write the sandbox identity", "error", err)
			return
		}
		path := filepath.Join(s.cfg.IdentityDir, "."+key)
		if err := os.WriteFile(path+".tmp", []byte(v+"\n"), 0o644); err != nil || os.Rename(path+".tmp", path) != nil {
			s.log.Warn("cannot write the sandbox identity", "file", path, "error", err)
		}
	}
}

// ports lists the TCP ports servers in the guest listen on.
func (s *Server) ports(w http.ResponseWriter, _ *http.Request) {
	list, err := ports.Inventory("/proc", s.cfg.Forwarder, s.cfg.Port)
	if err != nil {
		httperr.Write(w, http.StatusInternalServerError, "list ports: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(list)
}

func (s *Server) metrics(w http.ResponseWriter, _ *http.Request) {
	snap, err := s.sampler.Read()
	if err != nil {
		httperr.Write(w, http.StatusInternalServerError, "read metrics: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(snap)
}

// prepareSnapshot flushes file systems so that a memory snapshot taken
// next holds no dirty data that the disk lacks.
func (s *Server) prepareSnapshot(w http.ResponseWriter, _ *http.Request) {
	start := time.Now()
	unix.Sync()
	s.log.Info("prepared for snapshot", "sync", time.Since(start))
	w.WriteHeader(http.StatusNoContent)
}
