package mail

import (
	"context"
	"strings"
	"testing"

	"github.com/wrenn/wrenn/internal/testutil/smtptest"
)

func TestParse(t *testing.T) {
	s, err := Parse("smtp://bot:p%40ss@mail.example.com?from=wrenn@example.com")
	if err != nil || s.Addr != "mail.example.com:587" || s.Username != "bot" || s.Password != "p@ss" || s.ImplicitTLS {
		t.Fatalf("%+v %v", s, err)
	}
	s, err = Parse("smtps://mail.example.com?from=wrenn@example.com")
	if err != nil || s.Addr != "mail.example.com:465" || !s.ImplicitTLS {
		t.Fatalf("%+v %v", s, err)
	}
	for _, bad := range []string{"http://mail.example.com?from=a@b.c", "smtp://?from=a@b.c", "smtp://mail.example.com", "smtp://mail.example.com?from=nope"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}

func TestSend(t *testing.T) {
	box := smtptest.Start(t)
	s := &SMTP{Addr: box.Addr, From: "wrenn@example.com"}
	if err := s.Send(context.Background(), "a@example.com", "Hello é", "line one\nline two\n"); err != nil {
		t.Fatal(err)
	}
	m := box.Messages()
	if len(m) != 1 || m[0].From != "wrenn@example.com" || m[0].To != "a@example.com" || !strings.Contains(m[0].Data, "line one\nline two") ||
		!strings.Contains(m[0].Data, "Subject: =?utf-8?q?Hello_=C3=A9?=") {
		t.Fatalf("%+v", m)
	}
	if err := s.Send(context.Background(), "a@example.com\r\nBcc: x@example.com", "s", "b"); err == nil {
		t.Fatal("header injection accepted")
	}
}
