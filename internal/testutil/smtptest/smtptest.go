// Package smtptest is a minimal SMTP server for tests: it accepts every
// message (no TLS, no auth) and hands it to the test.
package smtptest

import (
	"net"
	"net/textproto"
	"strings"
	"sync"
	"testing"
)

// Message is one received mail.
type Message struct {
	From, To string
	Data     string // headers and body as sent
}

// Server listens on loopback until the test ends.
type Server struct {
	Addr string
	mu   sync.Mutex
	msgs []Message
}

// Start runs a server for the test.
func Start(t *testing.T) *Server {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Addr: ln.Addr().String()}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go s.serve(conn)
		}
	}()
	return s
}

// Messages returns what was received so far.
func (s *Server) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message{}, s.msgs...)
}

func (s *Server) serve(conn net.Conn) {
	defer conn.Close()
	tp := textproto.NewConn(conn)
	_ = tp.PrintfLine("220 smtptest ready")
	var m Message
	for {
		line, err := tp.ReadLine()
		if err != nil {
			return
		}
		verb := strings.ToUpper(strings.SplitN(line, " ", 2)[0])
		switch verb {
		case "EHLO", "HELO":
			_ = tp.PrintfLine("250 smtptest")
		case "MAIL":
			m = Message{From: addr(line)}
			_ = tp.PrintfLine("250 ok")
		case "RCPT":
			m.To = addr(line)
			_ = tp.PrintfLine("250 ok")
		case "DATA":
			_ = tp.PrintfLine("354 go on")
			data, err := tp.ReadDotBytes()
			if err != nil {
				return
			}
			m.Data = string(data)
			s.mu.Lock()
			s.msgs = append(s.msgs, m)
			s.mu.Unlock()
			_ = tp.PrintfLine("250 queued")
		case "QUIT":
			_ = tp.PrintfLine("221 bye")
			return
		default:
			_ = tp.PrintfLine("250 ok")
		}
	}
}

// addr takes the address out of "MAIL FROM:<a@b>" or "RCPT TO:<a@b>".
func addr(line string) string {
	_, rest, _ := strings.Cut(line, "<")
	a, _, _ := strings.Cut(rest, ">")
	return a
}
