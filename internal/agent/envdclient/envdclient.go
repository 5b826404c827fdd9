// Package envdclient is the host agent's client for envd inside a sandbox.
package envdclient

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/readlimit"
	"github.com/wrenn/wrenn/internal/safetext"
	fspb "github.com/wrenn/wrenn/proto/envd/filesystem"
	"github.com/wrenn/wrenn/proto/envd/filesystem/filesystemconnect"
	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

// Port is where envd listens in every guest.
const Port = 49983

// What the agent reads from envd is bounded: the guest is less trusted
// than the host, and a program in it can take over envd's port. Per
// sandbox, at most maxListingsAtOnce listings and maxHeldOutputs command
// outputs are held at a time, so one hostile guest costs the agent a
// bounded amount of memory however many calls its tenant makes.
const (
	// MaxListing bounds a directory listing or a process list.
	MaxListing = 2 << 20
	// maxStreamMessage bounds one message of a process's stream (envd
	// sends output in pieces of 32 KiB).
	maxStreamMessage = 256 << 10
	// maxSmallBody bounds every other answer: /metrics, errors, the
	// replies to MakeDir, Remove, SendInput and the like.
	maxSmallBody = 64 << 10
	// maxHeaderBytes bounds the response headers envd may send.
	maxHeaderBytes = 64 << 10
	// maxMessageText bounds an error message from envd passed on to callers.
	maxMessageText = 1024

	maxListingsAtOnce = 2
	maxHeldOutputs    = 8
)

// Client talks to one sandbox's envd.
type Client struct {
	base  string
	token string
	http  *http.Client
	// proc and fs carry calls with small answers and the process streams;
	// procList and fsList the listings.
	proc     processconnect.ProcessClient
	fs       filesystemconnect.FilesystemClient
	procList processconnect.ProcessClient
	fsList   filesystemconnect.FilesystemClient
	listings chan struct{}
	outputs  chan struct{}
}

// tokenTransport adds the sandbox's access token to every request.
type tokenTransport struct {
	token string
	next  http.RoundTripper
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the pool.
func (t tokenTransport) CloseIdleConnections() {
	if c, ok := t.next.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

func (t tokenTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.token != "" {
		r = r.Clone(r.Context())
		r.Header.Set("X-Access-Token", t.token)
	}
	return t.next.RoundTrip(r)
}

// New returns a client for envd at host (an IP address) with the token
// set by Init (empty before Init).
func New(host, token string) *Client {
	base := fmt.Sprintf("http://%s:%d", host, Port)
	pool := newTransport()
	bounded := func(maxBody int64) *http.Client {
		return &http.Client{Transport: tokenTransport{token: token, next: &readlimit.Transport{
			Next: pool, MaxBody: maxBody, MaxMessage: maxStreamMessage,
			// A download is read in chunks and bounded by its caller.
			Stream: func(r *http.Request) bool { return r.Method == http.MethodGet && r.URL.Path == "/files" },
		}}}
	}
	small, large := bounded(maxSmallBody), bounded(MaxListing+maxSmallBody)
	// No compression: the guest is one hop away, and a compressed answer
	// is how a small reply becomes a large allocation.
	opts := func(max int) []connect.ClientOption {
		return []connect.ClientOption{connect.WithReadMaxBytes(max), connect.WithAcceptCompression("gzip", nil, nil)}
	}
	return &Client{
		base: base, token: token, http: small,
		proc:     processconnect.NewProcessClient(small, base, opts(maxStreamMessage)...),
		fs:       filesystemconnect.NewFilesystemClient(small, base, opts(maxSmallBody)...),
		procList: processconnect.NewProcessClient(large, base, opts(MaxListing)...),
		fsList:   filesystemconnect.NewFilesystemClient(large, base, opts(MaxListing)...),
		listings: make(chan struct{}, maxListingsAtOnce),
		outputs:  make(chan struct{}, maxHeldOutputs),
	}
}

// hold takes one of slots, waiting for it until ctx ends.
func hold(ctx context.Context, slots chan struct{}) (release func(), err error) {
	select {
	case slots <- struct{}{}:
		return func() { <-slots }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for the sandbox's earlier calls to finish: %w", ctx.Err())
	}
}

// HoldOutput reserves room for one command's output held whole (a unary
// exec); release it when the output has been sent on.
func (c *Client) HoldOutput(ctx context.Context) (release func(), err error) {
	return hold(ctx, c.outputs)
}

// newTransport never asks for or decodes compressed bodies and bounds the
// headers it accepts.
func newTransport() *http.Transport {
	return &http.Transport{MaxIdleConnsPerHost: 8, IdleConnTimeout: time.Minute,
		DisableCompression: true, MaxResponseHeaderBytes: maxHeaderBytes}
}

// Close drops the client's idle connections; it stays usable and dials
// again when needed.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// AsUser names the Linux user a Connect request acts as ("" = envd's default).
func AsUser[T any](req *connect.Request[T], user string) *connect.Request[T] {
	if user != "" {
		req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
	}
	return req
}

// InitRequest is envd's POST /init body.
type InitRequest struct {
	EnvVars     map[string]string `json:"envVars,omitempty"`
	AccessToken string            `json:"accessToken,omitempty"`
	Timestamp   time.Time         `json:"timestamp"`
	// A sandbox started from a memory template gets its own host name and
	// fresh kernel randomness (envds older than memory templates refuse these).
	Hostname string `json:"hostname,omitempty"`
	Entropy  []byte `json:"entropy,omitempty"`
}

// Init sets the sandbox's token, environment and clock.
func (c *Client) Init(ctx context.Context, in InitRequest) error {
	body, _ := json.Marshal(in)
	return c.post(ctx, "/init", "application/json", bytes.NewReader(body))
}

// InitWhenUp is Init as soon as envd takes connections: it tries again
// while none can be made (the guest is still booting or waking), and
// stops at the first request envd received, whatever its answer (an
// /init that reached envd may have changed its token). One request
// instead of a health poll and then /init: each costs a woken guest tens
// of milliseconds of CPU. The clock it sends is read at each attempt.
func (c *Client) InitWhenUp(ctx context.Context, in InitRequest) error {
	dialer := &net.Dialer{Timeout: 500 * time.Millisecond}
	tr := newTransport()
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, notUp{err}
		}
		return conn, nil
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tokenTransport{token: c.token, next: &readlimit.Transport{Next: tr, MaxBody: maxSmallBody}}}
	for {
		in.Timestamp = time.Now().UTC()
		body, _ := json.Marshal(in)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/init", bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		res, err := client.Do(req)
		if err == nil {
			defer res.Body.Close()
			if res.StatusCode/100 != 2 {
				return fmt.Errorf("init envd: %w", responseError("/init", res))
			}
			return nil
		}
		var down notUp
		if !errors.As(err, &down) {
			return fmt.Errorf("init envd: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("envd at %s not up: %w (last: %v)", c.base, ctx.Err(), down.err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// notUp is a connection to envd that could not be made.
type notUp struct{ err error }

func (e notUp) Error() string { return e.err.Error() }

// PrepareSnapshot asks the guest to flush its file systems.
func (c *Client) PrepareSnapshot(ctx context.Context) error {
	return c.post(ctx, "/snapshot/prepare", "", nil)
}

func (c *Client) post(ctx context.Context, path, contentType string, body io.Reader) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, body)
	if err != nil {
		return err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	res, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("envd %s: %w", path, err)
	}
	defer res.Body.Close()
	if res.StatusCode/100 != 2 {
		return responseError(path, res)
	}
	return nil
}

// Metrics is envd's GET /metrics body.
type Metrics struct {
	CPUCount   int     `json:"cpu_count"`
	CPUUsedPct float64 `json:"cpu_used_pct"`
	MemTotal   int64   `json:"mem_total"`
	MemUsed    int64   `json:"mem_used"`
	DiskTotal  int64   `json:"disk_total"`
	DiskUsed   int64   `json:"disk_used"`
}

// Metrics reads the guest's resource use.
func (c *Client) Metrics(ctx context.Context) (Metrics, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/metrics", nil)
	res, err := c.http.Do(req)
	if err != nil {
		return Metrics{}, fmt.Errorf("envd metrics: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return Metrics{}, responseError("/metrics", res)
	}
	data, err := io.ReadAll(io.LimitReader(res.Body, maxSmallBody+1))
	if err != nil {
		return Metrics{}, fmt.Errorf("envd metrics: %w", err)
	}
	if len(data) > maxSmallBody {
		return Metrics{}, fmt.Errorf("envd metrics: the answer is larger than %d KiB", maxSmallBody>>10)
	}
	var m Metrics
	if err := json.Unmarshal(data, &m); err != nil {
		return Metrics{}, fmt.Errorf("envd metrics: %w", err)
	}
	return m, nil
}

// ListeningPort is one entry of envd's GET /ports.
type ListeningPort struct {
	Port      uint16   `json:"port"`
	Addresses []string `json:"addresses"`
	Forwarded bool     `json:"forwarded"`
	PID       int      `json:"pid"`
	Command   string   `json:"command"`
}

// Ports lists the TCP ports servers in the guest listen on.
func (c *Client) Ports(ctx context.Context) ([]ListeningPort, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/ports", nil)
	res, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("envd ports: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, responseError("/ports", res)
	}
	data, err := io.ReadAll(io.LimitReader(res.Body, maxSmallBody+1))
	if err != nil {
		return nil, fmt.Errorf("envd ports: %w", err)
	}
	if len(data) > maxSmallBody {
		return nil, fmt.Errorf("envd ports: the answer is larger than %d KiB", maxSmallBody>>10)
	}
	var ports []ListeningPort
	if err := json.Unmarshal(data, &ports); err != nil {
		return nil, fmt.Errorf("envd ports: %w", err)
	}
	return ports, nil
}

// FileError is an error answer from envd's /files, with its HTTP status.
type FileError struct {
	Status  int
	Message string
}

func (e *FileError) Error() string { return fmt.Sprintf("envd: %d: %s", e.Status, e.Message) }

func responseError(path string, res *http.Response) error {
	var body struct {
		Message string `json:"message"`
	}
	data, _ := io.ReadAll(io.LimitReader(res.Body, maxSmallBody))
	if json.Unmarshal(data, &body) != nil || body.Message == "" {
		body.Message = fmt.Sprintf("%s answered %d", path, res.StatusCode)
	}
	return &FileError{Status: res.StatusCode, Message: safetext.Clip(body.Message, maxMessageText)}
}

// OpenFile starts a download; the caller closes the reader.
func (c *Client) OpenFile(ctx context.Context, path, user string) (io.ReadCloser, error) {
	q := url.Values{"path": {path}}
	if user != "" {
		q.Set("username", user)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/files?"+q.Encode(), nil)
	res, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if res.StatusCode != http.StatusOK {
		defer res.Body.Close()
		return nil, responseError("/files", res)
	}
	return res.Body, nil
}

// ReadFile downloads a file of at most limit bytes.
func (c *Client) ReadFile(ctx context.Context, path, user string, limit int64) ([]byte, error) {
	body, err := c.OpenFile(ctx, path, user)
	if err != nil {
		return nil, err
	}
	defer body.Close()
	data, err := io.ReadAll(io.LimitReader(body, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, &FileError{Status: http.StatusRequestEntityTooLarge, Message: fmt.Sprintf("%s is larger than %d bytes; use a streaming read", path, limit)}
	}
	return data, nil
}

// WriteFile uploads content to path (parents are created).
func (c *Client) WriteFile(ctx context.Context, path, user string, content io.Reader) error {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		part, err := mw.CreateFormFile("file", "upload")
		if err == nil {
			_, err = io.Copy(part, content)
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
	}()
	q := url.Values{"path": {path}}
	if user != "" {
		q.Set("username", user)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/files?"+q.Encode(), pr)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	res, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return responseError("/files", res)
	}
	return nil
}

// ExecEvent is one event of a running command.
type ExecEvent struct {
	PID      uint32
	Stdout   []byte
	Stderr   []byte
	PTY      []byte
	ExitCode *int32
}

// ExecSpec is a command to run.
type ExecSpec struct {
	Cmd   string
	Args  []string
	Env   map[string]string
	Cwd   string
	User  string
	Stdin []byte
	Tag   string
	// PTY, when set, runs the command on a terminal of this size.
	PTY *PTYSize
	// KeepStdin leaves stdin open for later SendInput calls.
	KeepStdin bool
	// KillOnCancel kills the process's group when ctx ends before the
	// process does (a foreground command whose caller gave up or timed
	// out); otherwise it runs on, as background processes do.
	KillOnCancel bool
}

// killWait bounds the kill of a cancelled foreground command.
const killWait = 5 * time.Second

// PTYSize is a terminal size.
type PTYSize struct{ Cols, Rows uint32 }

// Exec runs a command and hands each event to fn until it ends.
func (c *Client) Exec(ctx context.Context, spec ExecSpec, fn func(ExecEvent) error) error {
	withStdin := len(spec.Stdin) > 0 || spec.KeepStdin
	msg := &pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: spec.Cmd, Args: spec.Args, Envs: spec.Env},
		Stdin:   &withStdin,
	}
	if spec.Cwd != "" {
		msg.Process.Cwd = &spec.Cwd
	}
	if spec.Tag != "" {
		msg.Tag = &spec.Tag
	}
	if spec.PTY != nil {
		msg.Pty = &pb.PTY{Size: &pb.PTY_Size{Cols: spec.PTY.Cols, Rows: spec.PTY.Rows}}
	}
	stream, err := c.proc.Start(ctx, AsUser(connect.NewRequest(msg), spec.User))
	if err != nil {
		return err
	}
	defer stream.Close()
	var pid uint32
	ended := false
	err = follow(stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err, func(ev ExecEvent) error {
		if ev.PID != 0 {
			pid = ev.PID
			if len(spec.Stdin) > 0 {
				if err := c.sendStdin(ctx, ev.PID, spec.Stdin, !spec.KeepStdin); err != nil {
					return err
				}
			}
		}
		if ev.ExitCode != nil {
			ended = true
		}
		return fn(ev)
	})
	if spec.KillOnCancel && ctx.Err() != nil && pid != 0 && !ended {
		// envd signals the whole process group, so what the command
		// started goes with it.
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killWait)
		defer cancel()
		if kerr := c.Signal(kctx, &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, true); kerr != nil && connect.CodeOf(kerr) != connect.CodeNotFound {
			return errors.Join(err, fmt.Errorf("kill process %d: %w", pid, kerr))
		}
	}
	return err
}

// ErrStopFollowing, returned by an event callback, ends the stream early
// without an error (the process keeps running).
var ErrStopFollowing = errors.New("stop following")

// follow turns a Start or Connect stream into events until the end event.
func follow(recv func() bool, msg func() *pb.ProcessEvent, streamErr func() error, fn func(ExecEvent) error) error {
	for recv() {
		var out ExecEvent
		switch e := msg().GetEvent().(type) {
		case *pb.ProcessEvent_Start:
			out.PID = e.Start.GetPid()
		case *pb.ProcessEvent_Data:
			out.Stdout, out.Stderr, out.PTY = e.Data.GetStdout(), e.Data.GetStderr(), e.Data.GetPty()
		case *pb.ProcessEvent_End:
			code := e.End.GetExitCode()
			out.ExitCode = &code
		default:
			continue
		}
		if err := fn(out); err != nil {
			if errors.Is(err, ErrStopFollowing) {
				return nil
			}
			return err
		}
		if out.ExitCode != nil {
			return nil
		}
	}
	if err := streamErr(); err != nil {
		return tooLarge(err, maxStreamMessage, "a message of the process's stream", "")
	}
	return errors.New("envd closed the stream before the process ended")
}

// size writes a byte count for a message.
func size(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// tooLarge turns the Connect error for an answer over its limit into one
// that names the limit and what to do instead. Its code is OutOfRange, so
// that callers can tell it from a host without room (ResourceExhausted).
func tooLarge(err error, limit int, what, hint string) error {
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		return err
	}
	msg := fmt.Sprintf("%s from envd is larger than %s, the most the host agent accepts", what, size(limit))
	if hint != "" {
		msg += "; " + hint
	}
	return connect.NewError(connect.CodeOutOfRange, errors.New(msg))
}

// Selector names a process by pid, or by tag when pid is 0.
func Selector(pid uint32, tag string) (*pb.ProcessSelector, error) {
	switch {
	case pid != 0:
		return &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, nil
	case tag != "":
		return &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}, nil
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("name the process by pid or tag"))
	}
}

// Connect streams a running process's events from now until it ends.
func (c *Client) Connect(ctx context.Context, sel *pb.ProcessSelector, fn func(ExecEvent) error) error {
	stream, err := c.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
	if err != nil {
		return err
	}
	defer stream.Close()
	return follow(stream.Receive, func() *pb.ProcessEvent { return stream.Msg().GetEvent() }, stream.Err, fn)
}

// List returns the processes envd runs.
func (c *Client) List(ctx context.Context) ([]*pb.ProcessInfo, error) {
	release, err := hold(ctx, c.listings)
	if err != nil {
		return nil, err
	}
	defer release()
	res, err := c.procList.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		return nil, tooLarge(err, MaxListing, "the process list", "")
	}
	return res.Msg.GetProcesses(), nil
}

// SendInput writes to a process's stdin, or its terminal when pty is set,
// and then closes stdin if asked.
func (c *Client) SendInput(ctx context.Context, sel *pb.ProcessSelector, data []byte, pty, closeStdin bool) error {
	if len(data) > 0 {
		in := &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: data}}
		if pty {
			in = &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: data}}
		}
		if _, err := c.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: in})); err != nil {
			return err
		}
	}
	if closeStdin {
		_, err := c.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
		return err
	}
	return nil
}

// Resize changes a process's terminal size.
func (c *Client) Resize(ctx context.Context, sel *pb.ProcessSelector, size PTYSize) error {
	_, err := c.proc.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: size.Cols, Rows: size.Rows}}}))
	return err
}

// Signal sends SIGTERM, or SIGKILL when force is set.
func (c *Client) Signal(ctx context.Context, sel *pb.ProcessSelector, force bool) error {
	sig := pb.Signal_SIGNAL_SIGTERM
	if force {
		sig = pb.Signal_SIGNAL_SIGKILL
	}
	_, err := c.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: sig}))
	return err
}

func (c *Client) sendStdin(ctx context.Context, pid uint32, data []byte, closeAfter bool) error {
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
	if _, err := c.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: data}}})); err != nil {
		return err
	}
	if !closeAfter {
		return nil
	}
	_, err := c.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
	return err
}

// ListDir lists a directory.
func (c *Client) ListDir(ctx context.Context, path, user string, depth uint32) ([]*fspb.EntryInfo, error) {
	release, err := hold(ctx, c.listings)
	if err != nil {
		return nil, err
	}
	defer release()
	res, err := c.fsList.ListDir(ctx, AsUser(connect.NewRequest(&fspb.ListDirRequest{Path: path, Depth: depth}), user))
	if err != nil {
		return nil, tooLarge(err, MaxListing, "the listing of "+path, "list a subdirectory or use a lower depth")
	}
	return res.Msg.GetEntries(), nil
}

// MakeDir creates a directory and its parents.
func (c *Client) MakeDir(ctx context.Context, path, user string) error {
	_, err := c.fs.MakeDir(ctx, AsUser(connect.NewRequest(&fspb.MakeDirRequest{Path: path}), user))
	return err
}

// Remove deletes a file or directory tree.
func (c *Client) Remove(ctx context.Context, path, user string) error {
	_, err := c.fs.Remove(ctx, AsUser(connect.NewRequest(&fspb.RemoveRequest{Path: path}), user))
	return err
}
