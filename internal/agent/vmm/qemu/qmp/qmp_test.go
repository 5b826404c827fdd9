package qmp

import (
	"bufio"
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// stallingQEMU greets and negotiates like QEMU, then never answers a
// command (a VMM stuck writing a snapshot to a dead disk).
func stallingQEMU(t *testing.T) string {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		r := bufio.NewReader(conn)
		_, _ = conn.Write([]byte(`{"QMP": {"version": {}, "capabilities": []}}` + "\n"))
		_, _ = r.ReadString('\n') // qmp_capabilities
		_, _ = conn.Write([]byte(`{"return": {}}` + "\n"))
		_, _ = r.ReadString('\n') // the command it sits on
		time.Sleep(time.Minute)
	}()
	return socket
}

func TestExecuteEndsWhenItsContextIsCancelled(t *testing.T) {
	c, err := Dial(context.Background(), stallingQEMU(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background()) // no deadline: a cancel alone must do
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	_, err = c.Execute(ctx, "stop", nil)
	if !errors.Is(err, context.Canceled) || time.Since(start) > 5*time.Second {
		t.Fatalf("after %v: %v", time.Since(start), err)
	}
	// The connection cannot pair a late reply with a new command: refused.
	if _, err := c.Execute(context.Background(), "query-status", nil); err == nil {
		t.Fatal("a command on a connection given up on was sent")
	}
}
