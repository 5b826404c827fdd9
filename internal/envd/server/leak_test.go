package server_test

import (
	"context"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/wrenn/wrenn/proto/envd/filesystem"
	pb "github.com/wrenn/wrenn/proto/envd/process"
)

// TestClientDisconnectLeaksNothing drops clients in the middle of process
// and watch streams and checks that goroutines, file descriptors and
// processes return to where they were.
func TestClientDisconnectLeaksNothing(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 60*time.Second)
	settle := func() {
		h.http.CloseIdleConnections()
		time.Sleep(300 * time.Millisecond)
	}
	h.run(ctx, sh("true")) // warm up the connection pool and lazy init
	settle()
	goroutines, fds := runtime.NumGoroutine(), openFDs(t)

	for i := range 20 {
		clientCtx, drop := context.WithCancel(ctx)
		tag := "leak-" + strconv.Itoa(i)
		stream, err := h.proc.Start(clientCtx, connect.NewRequest(&pb.StartRequest{
			Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "while true; do echo spam; done"}},
			Tag:     &tag,
		}))
		if err != nil {
			t.Fatal(err)
		}
		stream.Receive()
		stream.Receive()
		drop() // the client vanishes while output is flowing
		stream.Close()

		// Re-attach and leave again, then kill.
		again, err := h.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}}))
		if err != nil {
			t.Fatal(err)
		}
		again.Receive()
		again.Close()
		if _, err := h.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{
			Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}, Signal: pb.Signal_SIGNAL_SIGKILL,
		})); err != nil {
			t.Fatal(err)
		}

		watchCtx, stopWatch := context.WithCancel(ctx)
		ws, err := h.fs.WatchDir(watchCtx, connect.NewRequest(&fspb.WatchDirRequest{Path: t.TempDir(), Recursive: true}))
		if err != nil {
			t.Fatal(err)
		}
		ws.Receive()
		stopWatch()
		ws.Close()
	}

	waitUntil(t, func() bool {
		l, err := h.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		return err == nil && len(l.Msg.GetProcesses()) == 0
	})
	waitUntil(t, func() bool {
		settle()
		return runtime.NumGoroutine() <= goroutines+2 && openFDs(t) <= fds+2
	})
	if kids := childProcesses(t); len(kids) > 0 {
		t.Fatalf("child processes left behind: %v", kids)
	}
}

func openFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// childProcesses lists live (non-zombie or zombie) children of this process.
func childProcesses(t *testing.T) []string {
	self := strconv.Itoa(os.Getpid())
	entries, _ := os.ReadDir("/proc")
	var kids []string
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command name: state, ppid, ...
		rest := string(stat[strings.LastIndexByte(string(stat), ')')+2:])
		fields := strings.Fields(rest)
		if len(fields) > 1 && fields[1] == self {
			kids = append(kids, e.Name()+" ("+fields[0]+")")
		}
	}
	return kids
}
