// Package qmp is a small client for the QEMU Machine Protocol over a Unix
// socket: the greeting, capability negotiation, commands and their replies.
// Asynchronous events are skipped; the driver polls state instead.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Client is one QMP connection. Commands are serialised; a caller stops
// waiting (for its turn or for QEMU) when its context ends, and a command
// given up on breaks the connection, whose late reply would otherwise be
// read as the next command's.
type Client struct {
	turn   chan struct{}
	conn   net.Conn
	r      *bufio.Reader
	broken error
}

// Error is an error reply from QEMU.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// Dial connects to a QMP socket, retrying until it appears or ctx ends,
// and negotiates capabilities.
func Dial(ctx context.Context, socket string) (*Client, error) {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", socket)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to QMP %s: %w (last error: %v)", socket, ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	c := &Client{turn: make(chan struct{}, 1), conn: conn, r: bufio.NewReader(conn)}
	stop := c.bound(ctx)
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := c.readJSON(&greeting); err != nil || greeting.QMP == nil {
		stop()
		conn.Close()
		return nil, fmt.Errorf("QMP greeting from %s: %v", socket, errors.Join(err, ctx.Err()))
	}
	if _, err := c.execute("qmp_capabilities", nil); err != nil {
		stop()
		conn.Close()
		return nil, errors.Join(err, ctx.Err())
	}
	stop()
	return c, nil
}

// bound makes blocked reads and writes on the connection end when ctx
// does (its deadline, or a cancel); the returned func lifts that.
func (c *Client) bound(ctx context.Context) func() {
	if deadline, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(deadline)
	}
	fired := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		_ = c.conn.SetDeadline(time.Now())
		close(fired)
	})
	return func() {
		if !stopAfter() {
			<-fired // it ran, or runs now: let it finish before the reset
		}
		_ = c.conn.SetDeadline(time.Time{})
	}
}

// Execute runs a command and returns its "return" value.
func (c *Client) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	return c.call(ctx, command, args, -1)
}

// PassFile hands QEMU a file under name (QMP getfd), for a migration to
// or from "fd:name": QEMU then needs no helper process to reach the file.
func (c *Client) PassFile(ctx context.Context, name string, f *os.File) error {
	_, err := c.call(ctx, "getfd", map[string]any{"fdname": name}, int(f.Fd()))
	return err
}

// call runs one command in its turn, within ctx.
func (c *Client) call(ctx context.Context, command string, args any, fd int) (json.RawMessage, error) {
	select {
	case c.turn <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp %s: waiting for the command before: %w", command, ctx.Err())
	}
	defer func() { <-c.turn }()
	if c.broken != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, c.broken)
	}
	stop := c.bound(ctx)
	out, err := c.send(command, args, fd)
	stop()
	var qerr *Error
	if err != nil && !errors.As(err, &qerr) {
		// A write or read that failed (a deadline, a cancel, a closed
		// socket) leaves QEMU's reply unread: the next one read would be
		// this one's, so the connection is done.
		c.broken = fmt.Errorf("connection unusable after an earlier command failed: %w", err)
		c.conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("qmp %s: %w", command, ctx.Err())
		}
	}
	return out, err
}

func (c *Client) execute(command string, args any) (json.RawMessage, error) {
	return c.send(command, args, -1)
}

// send writes a command, with the file descriptor fd attached when it is
// not -1, and reads its reply.
func (c *Client) send(command string, args any, fd int) (json.RawMessage, error) {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	data, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	data = append(data, '\n')
	if fd >= 0 {
		uc, ok := c.conn.(*net.UnixConn)
		if !ok {
			return nil, fmt.Errorf("qmp %s: file descriptors need a Unix socket", command)
		}
		_, _, err = uc.WriteMsgUnix(data, unix.UnixRights(fd), nil)
	} else {
		_, err = c.conn.Write(data)
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	for {
		var reply struct {
			Return json.RawMessage `json:"return"`
			Error  *Error          `json:"error"`
			Event  string          `json:"event"`
		}
		if err := c.readJSON(&reply); err != nil {
			return nil, fmt.Errorf("qmp %s: %w", command, err)
		}
		switch {
		case reply.Event != "":
			continue // asynchronous event, not our reply
		case reply.Error != nil:
			return nil, reply.Error
		default:
			return reply.Return, nil
		}
	}
}

// maxLine bounds one QMP message: a VMM a guest took over must not make
// the agent buffer without end.
const maxLine = 1 << 20

func (c *Client) readJSON(v any) error {
	var line []byte
	for {
		part, err := c.r.ReadSlice('\n')
		if len(line)+len(part) > maxLine {
			return fmt.Errorf("a QMP message longer than %d bytes", maxLine)
		}
		line = append(line, part...)
		if err == nil {
			return json.Unmarshal(line, v)
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
	}
}

// Status returns the VM's run state ("running", "paused", "inmigrate", ...).
func (c *Client) Status(ctx context.Context) (string, error) {
	raw, err := c.Execute(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// MigrationStatus returns query-migrate's status and error description.
func (c *Client) MigrationStatus(ctx context.Context) (status, errDesc string, err error) {
	raw, err := c.Execute(ctx, "query-migrate", nil)
	if err != nil {
		return "", "", err
	}
	var st struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return "", "", err
	}
	return st.Status, st.ErrorDesc, nil
}

// Close closes the connection.
func (c *Client) Close() error {
	if c == nil || c.conn == nil {
		return errors.New("qmp: not connected")
	}
	return c.conn.Close()
}
