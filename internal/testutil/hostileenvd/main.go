// Command hostileenvd is an attack program for Wrenn's tests. Run as root
// inside a guest, it does what a malicious tenant's code could: it takes
// envd's listening socket out of the running envd (pidfd_getfd), stops
// envd, cuts the host agent's open connections to it, and answers every
// request on envd's port with replies built to make the caller allocate:
// gzip bombs, endless bodies, oversized Connect envelopes and floods of
// process output. Each kind of request cycles through the variants, so
// repeated calls meet all of them.
//
// It writes nothing to its standard output (envd, stopped, holds that
// pipe); start it detached: setsid hostileenvd >/dev/null 2>&1 &
package main

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	pb "github.com/wrenn/wrenn/proto/envd/process"
)

const envdPort = 49983

// bombMiB is how much each gzip bomb inflates to; about 1 KiB of the wire
// per MiB.
const bombMiB = 2048

func main() {
	if err := run(); err != nil {
		_ = os.WriteFile("/tmp/hostileenvd.err", []byte(err.Error()+"\n"), 0o644)
		os.Exit(1)
	}
}

func run() error {
	// Let the exec that started us return before envd stops.
	time.Sleep(time.Second)
	pid, err := findProcess("envd")
	if err != nil {
		return err
	}
	if err := unix.Kill(pid, unix.SIGSTOP); err != nil {
		return fmt.Errorf("stop envd: %w", err)
	}
	ln, err := takeSockets(pid)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: &hostile{}, ReadHeaderTimeout: 10 * time.Second}
	_ = os.WriteFile("/tmp/hostileenvd.ready", nil, 0o644)
	return srv.Serve(ln)
}

// findProcess returns the pid of the process whose command name is name.
func findProcess(name string) (int, error) {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		comm, err := os.ReadFile(d + "/comm")
		if err == nil && strings.TrimSpace(string(comm)) == name {
			return strconv.Atoi(filepath.Base(d))
		}
	}
	return 0, fmt.Errorf("no %s process", name)
}

// takeSockets copies pid's listening socket on envd's port into this
// process and shuts down pid's connections on that port, so callers dial
// again and reach us.
func takeSockets(pid int) (net.Listener, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil, err
	}
	var ln net.Listener
	for _, e := range fds {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if !strings.HasPrefix(target, "socket:") {
			continue
		}
		n, _ := strconv.Atoi(e.Name())
		fd, err := unix.PidfdGetfd(pidfd, n, 0)
		if err != nil {
			continue
		}
		sa, err := unix.Getsockname(fd)
		in4, ok4 := sa.(*unix.SockaddrInet4)
		in6, ok6 := sa.(*unix.SockaddrInet6)
		if err != nil || !(ok4 && in4.Port == envdPort || ok6 && in6.Port == envdPort) {
			unix.Close(fd)
			continue
		}
		if listening, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); listening == 1 && ln == nil {
			f := os.NewFile(uintptr(fd), "envd-listener")
			ln, err = net.FileListener(f)
			f.Close()
			if err != nil {
				return nil, err
			}
			continue
		}
		_ = unix.Shutdown(fd, unix.SHUT_RDWR) // the socket, not just our copy
		unix.Close(fd)
	}
	if ln == nil {
		return nil, errors.New("envd has no listening socket on its port")
	}
	return ln, nil
}

type hostile struct{ calls atomic.Uint64 }

func (h *hostile) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := h.calls.Add(1)
	switch {
	case r.URL.Path == "/health":
		w.WriteHeader(http.StatusNoContent)
	case r.URL.Path == "/process.Process/Start" || r.URL.Path == "/process.Process/Connect":
		streamAttack(w, n)
	case strings.Count(r.URL.Path, "/") == 2 && strings.Contains(r.URL.Path, "."):
		unaryAttack(w, n)
	default: // /metrics, /files, /init, /snapshot/prepare, ...
		httpAttack(w, r, n)
	}
}

// gzipBomb writes a gzip stream that inflates to prefix, bombMiB MiB of
// 'A' and suffix: one small member repeated (readers join members).
func gzipBomb(w io.Writer, prefix, suffix []byte) {
	member := func(data []byte) []byte {
		var b bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&b, gzip.BestCompression)
		_, _ = zw.Write(data)
		_ = zw.Close()
		return b.Bytes()
	}
	_, _ = w.Write(member(prefix))
	mib := member(bytes.Repeat([]byte("A"), 1<<20))
	for i := 0; i < bombMiB; i++ {
		if _, err := w.Write(mib); err != nil {
			return
		}
	}
	_, _ = w.Write(member(suffix))
}

// endless writes 'A's until the reader goes away (or 8 GiB).
func endless(w io.Writer) {
	chunk := bytes.Repeat([]byte("A"), 64<<10)
	for i := 0; i < 8<<14; i++ {
		if _, err := w.Write(chunk); err != nil {
			return
		}
	}
}

// httpAttack answers envd's plain HTTP endpoints.
func httpAttack(w http.ResponseWriter, r *http.Request, n uint64) {
	status := http.StatusOK
	if r.Method != http.MethodGet {
		status = http.StatusInternalServerError // error bodies are read too
	}
	w.Header().Set("Content-Type", "application/json")
	if n%2 == 0 {
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(status)
		gzipBomb(w, []byte(`{"cpu_count":1,"message":"`), []byte(`"}`))
		return
	}
	w.WriteHeader(status)
	_, _ = w.Write([]byte(`{"cpu_count":1,"message":"`))
	endless(w)
}

// unaryAttack answers Connect unary calls (ListDir, List, MakeDir, ...).
func unaryAttack(w http.ResponseWriter, n uint64) {
	switch n % 3 {
	case 0: // a compressed message that inflates without end
		w.Header().Set("Content-Type", "application/proto")
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(http.StatusOK)
		gzipBomb(w, []byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x07}, nil) // field 1, length 2 GiB
	case 1: // an error whose message never ends, compressed
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(http.StatusInternalServerError)
		gzipBomb(w, []byte(`{"code":"internal","message":"`), []byte(`"}`))
	default: // an uncompressed message that never ends
		w.Header().Set("Content-Type", "application/proto")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x07})
		endless(w)
	}
}

// envelope frames one Connect streaming message.
func envelope(flags byte, size uint32, data []byte) []byte {
	head := make([]byte, 5)
	head[0] = flags
	binary.BigEndian.PutUint32(head[1:], size)
	return append(head, data...)
}

// streamAttack answers Start and Connect (process output streams).
func streamAttack(w http.ResponseWriter, n uint64) {
	w.Header().Set("Content-Type", "application/connect+proto")
	switch n % 3 {
	case 0: // a compressed envelope that inflates without end
		w.Header().Set("Connect-Content-Encoding", "gzip")
		w.WriteHeader(http.StatusOK)
		var bomb bytes.Buffer
		gzipBomb(&bomb, []byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x07}, nil)
		_, _ = w.Write(envelope(1, uint32(bomb.Len()), bomb.Bytes()))
	case 1: // an envelope that claims 4 GiB and keeps coming
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(envelope(0, 0xffffffff, nil))
		endless(w)
	default: // a flood of real output events, 200 KiB each (under the agent's bound), that never ends
		w.WriteHeader(http.StatusOK)
		start, _ := proto.Marshal(&pb.StartResponse{Event: &pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: 4242}}}})
		if _, err := w.Write(envelope(0, uint32(len(start)), start)); err != nil {
			return
		}
		out, _ := proto.Marshal(&pb.StartResponse{Event: &pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: &pb.ProcessEvent_DataEvent{
			Output: &pb.ProcessEvent_DataEvent_Stdout{Stdout: bytes.Repeat([]byte("A"), 200<<10)}}}}})
		frame := envelope(0, uint32(len(out)), out)
		for i := 0; i < 40<<10; i++ {
			if _, err := w.Write(frame); err != nil {
				return
			}
		}
	}
}
