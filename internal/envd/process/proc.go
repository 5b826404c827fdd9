package process

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"

	pb "github.com/wrenn/wrenn/proto/envd/process"
)

// outputChunk is the largest piece of output sent in one data event.
const outputChunk = 32 * 1024

// subscriberQueue bounds the events buffered for one client. A slow client
// slows the process down (its pipe fills) instead of growing memory.
const subscriberQueue = 16

// drainIdle is how long envd keeps reading a finished process's output
// while nothing arrives, before it stops waiting for descendants that
// inherited the output and still hold it open.
const drainIdle = time.Second

// proc is one process that envd started. It outlives the request that
// started it; clients come and go as subscribers.
type proc struct {
	pid    uint32
	tag    string
	config *pb.ProcessConfig
	cmd    *exec.Cmd

	ptyFile *os.File       // PTY master, when started with a PTY
	stdin   io.WriteCloser // stdin pipe, when stdin was requested
	inputMu sync.Mutex     // orders writes to stdin or the PTY

	mu     sync.Mutex
	subs   map[*subscriber]struct{}
	ended  bool
	endEvt *pb.ProcessEvent_EndEvent

	outputs   []*os.File // read ends of stdout/stderr, or the PTY master
	readers   sync.WaitGroup
	bytesRead atomic.Int64
	done      chan struct{} // closed after the end event was published
}

// subscriber is one client stream attached to a process.
type subscriber struct {
	events chan *pb.ProcessEvent
	gone   chan struct{} // closed when the client leaves
}

func newSubscriber() *subscriber {
	return &subscriber{events: make(chan *pb.ProcessEvent, subscriberQueue), gone: make(chan struct{})}
}

// subscribe attaches a client. It reports false when the process has
// already ended, so the caller can answer "not found".
func (p *proc) subscribe(s *subscriber) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended {
		return false
	}
	p.subs[s] = struct{}{}
	return true
}

func (p *proc) unsubscribe(s *subscriber) {
	p.mu.Lock()
	delete(p.subs, s)
	p.mu.Unlock()
}

// publish hands an event to every attached client, waiting for slow ones
// unless they leave.
func (p *proc) publish(ev *pb.ProcessEvent) {
	p.mu.Lock()
	subs := make([]*subscriber, 0, len(p.subs))
	for s := range p.subs {
		subs = append(subs, s)
	}
	p.mu.Unlock()
	for _, s := range subs {
		select {
		case s.events <- ev:
		case <-s.gone:
		}
	}
}

// start launches the command. The returned proc has its output readers
// running; the caller must call supervise.
func start(cfg startConfig) (*proc, error) {
	cmd := exec.Command(cfg.path, cfg.args...)
	cmd.Args[0] = cfg.argv0
	cmd.Env = cfg.env
	cmd.Dir = cfg.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cfg.credential}

	p := &proc{
		tag:    cfg.tag,
		config: cfg.config,
		cmd:    cmd,
		subs:   map[*subscriber]struct{}{},
		done:   make(chan struct{}),
	}
	if cfg.first != nil {
		p.subs[cfg.first] = struct{}{}
	}

	if cfg.pty != nil {
		// pty.StartWithAttrs makes the child a session leader with the PTY
		// as its controlling terminal; signals go to its process group.
		cmd.SysProcAttr.Setsid = true
		cmd.SysProcAttr.Setctty = true
		f, err := pty.StartWithAttrs(cmd, &pty.Winsize{Cols: uint16(cfg.pty.cols), Rows: uint16(cfg.pty.rows)}, cmd.SysProcAttr)
		if err != nil {
			return nil, err
		}
		p.ptyFile = f
		p.outputs = []*os.File{f}
		p.pid = uint32(cmd.Process.Pid)
		p.goRead(f, ptyData)
		return p, nil
	}

	cmd.SysProcAttr.Setpgid = true
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		closeAll(stdoutR, stdoutW)
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = stdoutW, stderrW
	var stdinR, stdinW *os.File
	if cfg.stdin {
		if stdinR, stdinW, err = os.Pipe(); err != nil {
			closeAll(stdoutR, stdoutW, stderrR, stderrW)
			return nil, fmt.Errorf("stdin pipe: %w", err)
		}
		cmd.Stdin = stdinR
	}
	// Without a stdin pipe the child reads /dev/null (exec's default).
	if err := cmd.Start(); err != nil {
		closeAll(stdoutR, stdoutW, stderrR, stderrW, stdinR, stdinW)
		return nil, err
	}
	// The child holds its own copies; ours would keep the pipes open forever.
	closeAll(stdoutW, stderrW, stdinR)
	if stdinW != nil {
		p.stdin = stdinW
	}
	p.pid = uint32(cmd.Process.Pid)
	p.outputs = []*os.File{stdoutR, stderrR}
	p.goRead(stdoutR, stdoutData)
	p.goRead(stderrR, stderrData)
	return p, nil
}

type streamKind int

const (
	stdoutData streamKind = iota
	stderrData
	ptyData
)

func dataEvent(kind streamKind, b []byte) *pb.ProcessEvent {
	d := &pb.ProcessEvent_DataEvent{}
	switch kind {
	case stdoutData:
		d.Output = &pb.ProcessEvent_DataEvent_Stdout{Stdout: b}
	case stderrData:
		d.Output = &pb.ProcessEvent_DataEvent_Stderr{Stderr: b}
	case ptyData:
		d.Output = &pb.ProcessEvent_DataEvent_Pty{Pty: b}
	}
	return &pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: d}}
}

func (p *proc) goRead(f *os.File, kind streamKind) {
	p.readers.Add(1)
	go func() {
		defer p.readers.Done()
		p.readOutput(f, kind)
	}()
}

// readOutput forwards one output stream until EOF (or EIO, which is how a
// PTY master reports that the last slave closed).
func (p *proc) readOutput(f *os.File, kind streamKind) {
	for {
		buf := make([]byte, outputChunk)
		n, err := f.Read(buf)
		if n > 0 {
			p.bytesRead.Add(int64(n))
			p.publish(dataEvent(kind, buf[:n]))
		}
		if err != nil {
			return
		}
	}
}

// supervise waits for the process to exit, drains its output, publishes
// the end event and releases every resource. onExit runs last.
func (p *proc) supervise(onExit func()) {
	readersDone := make(chan struct{})
	go func() {
		p.readers.Wait()
		close(readersDone)
	}()
	waitErr := p.cmd.Wait()
	p.drain(readersDone)
	closeAll(p.outputs...)
	if p.stdin != nil {
		_ = p.stdin.Close()
	}

	end := endEvent(p.cmd.ProcessState, waitErr)
	ev := &pb.ProcessEvent{Event: &pb.ProcessEvent_End{End: end}}
	p.publish(ev)

	p.mu.Lock()
	p.ended = true
	p.endEvt = end
	p.subs = map[*subscriber]struct{}{}
	p.mu.Unlock()
	close(p.done)
	onExit()
}

// drain waits for the output readers to reach EOF. A background child that
// inherited stdout can hold it open forever, so once the stream has been
// idle for drainIdle the read ends are closed, which unblocks the readers.
func (p *proc) drain(readersDone <-chan struct{}) {
	t := time.NewTicker(drainIdle)
	defer t.Stop()
	last := p.bytesRead.Load()
	for {
		select {
		case <-readersDone:
			return
		case <-t.C:
			now := p.bytesRead.Load()
			if now == last {
				closeAll(p.outputs...)
				<-readersDone
				return
			}
			last = now
		}
	}
}

func endEvent(state *os.ProcessState, waitErr error) *pb.ProcessEvent_EndEvent {
	end := &pb.ProcessEvent_EndEvent{ExitCode: -1}
	if state == nil {
		msg := "process could not be waited for"
		if waitErr != nil {
			msg = waitErr.Error()
		}
		end.Error = &msg
		return end
	}
	end.Status = state.String()
	if ws, ok := state.Sys().(syscall.WaitStatus); ok {
		switch {
		case ws.Exited():
			end.Exited = true
			end.ExitCode = int32(ws.ExitStatus())
		case ws.Signaled():
			// Shells report death by signal N as 128+N; clients expect the same.
			end.ExitCode = int32(128 + int(ws.Signal()))
		}
	}
	var exitErr *exec.ExitError
	if waitErr != nil && !errors.As(waitErr, &exitErr) {
		msg := waitErr.Error()
		end.Error = &msg
	}
	return end
}

// signal sends sig to the process's whole group, so children started by a
// shell die with it.
func (p *proc) signal(sig syscall.Signal) error {
	err := syscall.Kill(-int(p.pid), sig)
	if errors.Is(err, syscall.ESRCH) {
		err = syscall.Kill(int(p.pid), sig)
	}
	if errors.Is(err, syscall.ESRCH) {
		return nil // it is already gone; the end event is on its way
	}
	return err
}

func closeAll(files ...*os.File) {
	for _, f := range files {
		if f != nil {
			_ = f.Close()
		}
	}
}
