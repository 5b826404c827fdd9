package vmm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// A VMM's output (its guest's serial console and its own messages) goes
// into a FIFO in the run directory, never straight into a file: a guest
// with root can write to its console without end. The agent reads the
// FIFO into LogFile, which is capped (two files of MaxBytes at most) and
// rate-limited; what goes over the rate is dropped and counted in the log.
// While no agent reads (an agent restart), the VMM's writes fail and its
// output is lost, but the VMM runs on: QEMU and Firecracker both ignore
// SIGPIPE. The reader ends by itself when the last VMM process writing
// to the FIFO exits.
const (
	consoleFIFO = "console.fifo"
	// LogFile is the kept output, in a sandbox's run directory; the file
	// before it is LogFile + ".1".
	LogFile = "vmm.log"
)

// ConsoleLog says how much of a VMM's output is kept. The zero value
// keeps the defaults.
type ConsoleLog struct {
	// MaxBytes is the size at which the log is rotated; the current and
	// the previous file are kept (default 1 MiB).
	MaxBytes int64
	// BytesPerSecond is the sustained rate kept, with bursts of MaxBytes
	// (default 64 KiB/s).
	BytesPerSecond int64
	Log            *slog.Logger
}

func (c ConsoleLog) withDefaults() ConsoleLog {
	if c.MaxBytes <= 0 {
		c.MaxBytes = 1 << 20
	}
	if c.BytesPerSecond <= 0 {
		c.BytesPerSecond = 64 << 10
	}
	if c.Log == nil {
		c.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return c
}

// ConsolePath is the FIFO a VMM writes its guest's console to.
func ConsolePath(runDir string) string { return filepath.Join(runDir, consoleFIFO) }

// LogPath is the kept log of a sandbox's VMM.
func LogPath(runDir string) string { return filepath.Join(runDir, LogFile) }

// Open makes runDir's console FIFO if needed, starts reading it into the
// log, and returns a write end for a VMM's standard output and error.
// The caller closes its copy once the VMM started; done closes when the
// last writer has gone and everything read is in the log.
func (c ConsoleLog) Open(runDir string) (w *os.File, done <-chan struct{}, err error) {
	fifo := ConsolePath(runDir)
	if err := syscall.Mkfifo(fifo, 0o600); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, nil, fmt.Errorf("console fifo: %w", err)
	}
	// The reader first (a writer's open would wait for one), non-blocking
	// so that the read end is open before anyone writes.
	r, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("console fifo: %w", err)
	}
	if w, err = os.OpenFile(fifo, os.O_WRONLY, 0); err != nil {
		r.Close()
		return nil, nil, fmt.Errorf("console fifo: %w", err)
	}
	return w, c.start(r, runDir), nil
}

// Follow reads an adopted VMM's console again (after an agent restart);
// it returns at once and reads until the VMM exits.
func (c ConsoleLog) Follow(runDir string) (done <-chan struct{}, err error) {
	r, err := os.OpenFile(ConsolePath(runDir), os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("console fifo: %w", err)
	}
	return c.start(r, runDir), nil
}

func (c ConsoleLog) start(r *os.File, runDir string) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.withDefaults().copy(r, runDir)
	}()
	return done
}

// copy moves the FIFO's bytes into the capped log until every writer is
// gone (end of file).
func (c ConsoleLog) copy(r *os.File, runDir string) {
	defer r.Close()
	out := &rotating{path: LogPath(runDir), max: c.MaxBytes}
	defer out.close()
	bucket := tokenBucket{rate: float64(c.BytesPerSecond), burst: float64(c.MaxBytes), tokens: float64(c.MaxBytes), last: time.Now()}
	var dropped int64
	warned := false
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			keep := bucket.take(n)
			if dropped > 0 && keep > 0 {
				out.write([]byte(fmt.Sprintf("\n[wrenn-agent: %d bytes of console output dropped: over %d KiB/s]\n", dropped, c.BytesPerSecond>>10)))
				dropped = 0
			}
			out.write(buf[:keep])
			if keep < n {
				dropped += int64(n - keep)
				if !warned {
					c.Log.Warn("a guest writes to its console faster than is kept; dropping the excess", "run_dir", runDir, "kept_kib_per_s", c.BytesPerSecond>>10)
					warned = true
				}
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				c.Log.Warn("console read failed", "run_dir", runDir, "error", err)
			}
			return
		}
	}
}

// tokenBucket allows rate bytes a second, in bursts of up to burst.
type tokenBucket struct {
	rate, burst, tokens float64
	last                time.Time
}

// take returns how many of n bytes fit now and spends them.
func (b *tokenBucket) take(n int) int {
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	keep := min(n, int(b.tokens))
	b.tokens -= float64(keep)
	return keep
}

// rotating appends to path and, past max bytes, moves it to path.1 and
// starts again. Write errors (a full disk) lose output, never the VMM.
type rotating struct {
	path string
	max  int64
	f    *os.File
	size int64
}

func (r *rotating) write(p []byte) {
	if len(p) == 0 || r.f == nil && !r.open() {
		return
	}
	if r.size > 0 && r.size+int64(len(p)) > r.max {
		r.close()
		_ = os.Rename(r.path, r.path+".1")
		if !r.open() {
			return
		}
	}
	n, _ := r.f.Write(p)
	r.size += int64(n)
}

func (r *rotating) open() bool {
	f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return false
	}
	r.f, r.size = f, 0
	if fi, err := f.Stat(); err == nil {
		r.size = fi.Size() // an adopted VMM's log goes on where it was
	}
	return true
}

func (r *rotating) close() {
	if r.f != nil {
		r.f.Close()
		r.f, r.size = nil, 0
	}
}

// tailBytes is how much of the end of a log LogTail reads.
const tailBytes = 64 << 10

// LogTail returns the last n lines of a VMM's log (path, and path.1 when
// path alone is short), joined for an error message. It reads only the
// ends of the files, whatever their size.
func LogTail(path string, n int) string {
	text, err := readEnd(path, tailBytes)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(text), "\n")
	if len(lines) < n {
		if older, err := readEnd(path+".1", tailBytes); err == nil {
			lines = append(strings.Split(strings.TrimSpace(older), "\n"), lines...)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimSpace(strings.Join(lines, " | "))
}

// readEnd reads at most the last limit bytes of a file.
func readEnd(path string, limit int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	start := max(0, fi.Size()-limit)
	buf := make([]byte, fi.Size()-start)
	n, err := f.ReadAt(buf, start)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	return string(buf[:n]), nil
}
