// Package envdbench measures envd against the plain operations it wraps:
// an exec round trip against a direct fork/exec, and file transfer through
// /files against a bare loopback TCP copy of the same bytes.
package envdbench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/bench"
	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

const suite = "envd"

// Config sizes the runs.
type Config struct {
	EnvdBinary    string
	ExecRuns      int   // sequential round trips
	TransferBytes int64 // bytes per upload or download
	TransferRuns  int   // the median run is reported
	Log           *slog.Logger
}

// Run starts envd --dev and measures it.
func Run(ctx context.Context, cfg Config) ([]bench.Result, error) {
	work, err := os.MkdirTemp("", "wrenn-bench-envd")
	if err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	defer os.RemoveAll(work)

	url, stop, err := startEnvd(ctx, cfg.EnvdBinary)
	if err != nil {
		return nil, err
	}
	defer stop()

	var results []bench.Result
	cfg.Log.Info("envd: exec round trips", "runs", cfg.ExecRuns)
	r, err := execRoundTrip(ctx, url, cfg.ExecRuns)
	if err != nil {
		return nil, err
	}
	results = append(results, r)

	cfg.Log.Info("envd: file transfers", "bytes", cfg.TransferBytes, "runs", cfg.TransferRuns)
	up, down, err := transfers(ctx, url, work, cfg.TransferBytes, cfg.TransferRuns)
	if err != nil {
		return nil, err
	}
	return append(results, up, down), nil
}

func startEnvd(ctx context.Context, binary string) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	_ = ln.Close()
	cmd := exec.CommandContext(ctx, binary, "--dev", "--port", port, "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return "", nil, fmt.Errorf("start %s: %w", binary, err)
	}
	stop := func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}
	url := "http://127.0.0.1:" + port
	deadline := time.Now().Add(10 * time.Second)
	for {
		res, err := http.Get(url + "/health")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusNoContent {
				return url, stop, nil
			}
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("envd at %s not healthy after 10 s", url)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func execRoundTrip(ctx context.Context, url string, runs int) (bench.Result, error) {
	client := processconnect.NewProcessClient(&http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}, url)
	no := false
	once := func() error {
		stream, err := client.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/true"}, Stdin: &no}))
		if err != nil {
			return err
		}
		defer stream.Close()
		ended := false
		for stream.Receive() {
			if stream.Msg().GetEvent().GetEnd() != nil {
				ended = true
			}
		}
		if err := stream.Err(); err != nil {
			return err
		}
		if !ended {
			return fmt.Errorf("no end event")
		}
		return nil
	}
	direct := func() error { return exec.CommandContext(ctx, "/bin/true").Run() }

	viaEnvd, err := sample(runs, once)
	if err != nil {
		return bench.Result{}, fmt.Errorf("exec through envd: %w", err)
	}
	plain, err := sample(runs, direct)
	if err != nil {
		return bench.Result{}, fmt.Errorf("direct exec: %w", err)
	}
	return bench.Latencies(suite, "exec round trip of /bin/true", viaEnvd, "fork/exec from Go", plain), nil
}

// sample times fn runs times after a short warm-up.
func sample(runs int, fn func() error) ([]time.Duration, error) {
	for range 10 {
		if err := fn(); err != nil {
			return nil, err
		}
	}
	out := make([]time.Duration, 0, runs)
	for range runs {
		start := time.Now()
		if err := fn(); err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

// payload is a repeatable stream of pseudo-random bytes; both sides of each
// comparison pay the same cost to produce it.
func payload(n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{1}), n)
}

func transfers(ctx context.Context, baseURL, work string, size int64, runs int) (bench.Result, bench.Result, error) {
	// The file as it is: Go's client would otherwise ask for gzip, which
	// envd honours (E2B's SDKs ask for it), and time the compression.
	hc := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	dest := filepath.Join(work, "envd-upload.bin")
	var upEnvd, upPlain, downEnvd, downPlain []time.Duration
	for range runs {
		d, err := timed(func() error { return upload(ctx, hc, baseURL, dest, size) })
		if err != nil {
			return bench.Result{}, bench.Result{}, fmt.Errorf("upload through envd: %w", err)
		}
		upEnvd = append(upEnvd, d)
		d, err = timed(func() error { return download(ctx, hc, baseURL, dest, size) })
		if err != nil {
			return bench.Result{}, bench.Result{}, fmt.Errorf("download through envd: %w", err)
		}
		downEnvd = append(downEnvd, d)

		plainDest := filepath.Join(work, "plain-upload.bin")
		d, err = timed(func() error { return plainUpload(plainDest, size) })
		if err != nil {
			return bench.Result{}, bench.Result{}, fmt.Errorf("loopback upload: %w", err)
		}
		upPlain = append(upPlain, d)
		d, err = timed(func() error { return plainDownload(plainDest, size) })
		if err != nil {
			return bench.Result{}, bench.Result{}, fmt.Errorf("loopback download: %w", err)
		}
		downPlain = append(downPlain, d)
		_ = os.Remove(plainDest)
		_ = os.Remove(dest)
	}
	name := fmt.Sprintf("upload %d MiB via POST /files", size>>20)
	up := bench.Throughput(suite, name, size, median(upEnvd), "TCP loopback copy to a file", median(upPlain))
	name = fmt.Sprintf("download %d MiB via GET /files", size>>20)
	down := bench.Throughput(suite, name, size, median(downEnvd), "TCP loopback copy from a file", median(downPlain))
	up.N, down.N = runs, runs
	return up, down, nil
}

// timed flushes dirty pages first, so one run's write-back does not slow
// the next run down.
func timed(fn func() error) (time.Duration, error) {
	syscall.Sync()
	start := time.Now()
	err := fn()
	return time.Since(start), err
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func upload(ctx context.Context, hc *http.Client, baseURL, dest string, size int64) error {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		w, err := mw.CreateFormFile("file", "bench.bin")
		if err == nil {
			_, err = io.Copy(w, payload(size))
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+"/files?path="+url.QueryEscape(dest), pr)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	res, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(res.Body)
		return fmt.Errorf("status %d: %s", res.StatusCode, body)
	}
	return nil
}

func download(ctx context.Context, hc *http.Client, baseURL, path string, size int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/files?path="+url.QueryEscape(path), nil)
	if err != nil {
		return err
	}
	res, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	n, err := io.Copy(io.Discard, res.Body)
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("got %d bytes, want %d", n, size)
	}
	return nil
}

// plainUpload sends the payload over a loopback TCP connection to a
// receiver that writes it to a file: the floor for any upload.
func plainUpload(dest string, size int64) error {
	return overLoopback(
		func(conn net.Conn) error {
			f, err := os.Create(dest)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, conn)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			return err
		},
		func(conn net.Conn) error {
			_, err := io.Copy(conn, payload(size))
			return err
		})
}

// plainDownload reads a file and sends it over loopback TCP to a reader.
func plainDownload(src string, size int64) error {
	return overLoopback(
		func(conn net.Conn) error {
			f, err := os.Open(src)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(conn, f)
			return err
		},
		func(conn net.Conn) error {
			n, err := io.Copy(io.Discard, conn)
			if err == nil && n != size {
				err = fmt.Errorf("got %d bytes, want %d", n, size)
			}
			return err
		})
}

// overLoopback connects client to server over one loopback TCP connection;
// the client's side is closed when it returns, which ends the server's read.
func overLoopback(server, client func(net.Conn) error) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer conn.Close()
		done <- server(conn)
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return err
	}
	cerr := client(conn)
	conn.Close()
	if serr := <-done; serr != nil {
		return serr
	}
	return cerr
}
