// Package mail sends the control plane's account mail (activation,
// password reset) over SMTP.
package mail

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"mime"
	"net"
	"net/mail"
	"net/smtp"
	"net/url"
	"strings"
	"time"
)

// Sender sends one plain-text message.
type Sender interface {
	Send(ctx context.Context, to, subject, body string) error
}

// SMTP sends through one SMTP server.
type SMTP struct {
	Addr     string // host:port
	From     string
	Username string
	Password string
	// ImplicitTLS dials TLS at once (smtps, port 465); otherwise STARTTLS
	// is used whenever the server offers it.
	ImplicitTLS bool
}

// Parse reads an SMTP URL: smtp://user:pass@host:587?from=wrenn@example.com
// (STARTTLS when offered) or smtps://...:465 (TLS from the start).
func Parse(raw string) (*SMTP, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("smtp url: %w", err)
	}
	if u.Scheme != "smtp" && u.Scheme != "smtps" {
		return nil, errors.New("smtp url must start with smtp:// or smtps://")
	}
	if u.Hostname() == "" {
		return nil, errors.New("smtp url needs a host")
	}
	from := u.Query().Get("from")
	if _, err := mail.ParseAddress(from); err != nil {
		return nil, errors.New("smtp url needs ?from=<sender address>")
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"smtp": "587", "smtps": "465"}[u.Scheme]
	}
	s := &SMTP{Addr: net.JoinHostPort(u.Hostname(), port), From: from, ImplicitTLS: u.Scheme == "smtps"}
	if u.User != nil {
		s.Username = u.User.Username()
		s.Password, _ = u.User.Password()
	}
	return s, nil
}

// Send delivers the message, within ctx's deadline (30 s at most).
func (s *SMTP) Send(ctx context.Context, to, subject, body string) error {
	if strings.ContainsAny(to, "\r\n") || strings.ContainsAny(subject, "\r\n") {
		return errors.New("mail: header values must be one line")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	host, _, _ := net.SplitHostPort(s.Addr)
	var (
		conn net.Conn
		err  error
	)
	d := &net.Dialer{}
	if s.ImplicitTLS {
		conn, err = (&tls.Dialer{NetDialer: d, Config: &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}}).DialContext(ctx, "tcp", s.Addr)
	} else {
		conn, err = d.DialContext(ctx, "tcp", s.Addr)
	}
	if err != nil {
		return fmt.Errorf("mail: connect to %s: %w", s.Addr, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	c, err := smtp.NewClient(conn, host)
	if err != nil {
		return fmt.Errorf("mail: greeting from %s: %w", s.Addr, err)
	}
	defer c.Close()
	if ok, _ := c.Extension("STARTTLS"); ok && !s.ImplicitTLS {
		if err := c.StartTLS(&tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}); err != nil {
			return fmt.Errorf("mail: starttls: %w", err)
		}
	}
	if s.Username != "" {
		// PlainAuth refuses to send the password without TLS (except to localhost).
		if err := c.Auth(smtp.PlainAuth("", s.Username, s.Password, host)); err != nil {
			return fmt.Errorf("mail: auth: %w", err)
		}
	}
	if err := c.Mail(s.From); err != nil {
		return fmt.Errorf("mail: from: %w", err)
	}
	if err := c.Rcpt(to); err != nil {
		return fmt.Errorf("mail: to: %w", err)
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("mail: data: %w", err)
	}
	msg := "From: " + s.From + "\r\nTo: " + to + "\r\nSubject: " + mime.QEncoding.Encode("utf-8", subject) +
		"\r\nDate: " + time.Now().Format(time.RFC1123Z) + "\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" +
		strings.ReplaceAll(body, "\n", "\r\n")
	if _, err := w.Write([]byte(msg)); err != nil {
		return fmt.Errorf("mail: write: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("mail: send: %w", err)
	}
	return c.Quit()
}
