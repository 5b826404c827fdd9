package main

import (
	"testing"

	"github.com/wrenn/wrenn/internal/controlplane/mail"
)

// Upstream Wrenn's SMTP_* settings make the same mailer WRENN_SMTP_URL would.
func TestUpstreamSMTPSettings(t *testing.T) {
	t.Setenv("SMTP_HOST", "")
	if got := upstreamSMTPURL(); got != "" {
		t.Fatalf("no SMTP_HOST: %q", got)
	}
	t.Setenv("SMTP_HOST", "mail.example.com")
	t.Setenv("SMTP_PORT", "465")
	t.Setenv("SMTP_USERNAME", "wrenn")
	t.Setenv("SMTP_PASSWORD", "p@ss:word")
	t.Setenv("SMTP_FROM_EMAIL", "noreply@example.com")
	m, err := mail.Parse(upstreamSMTPURL())
	if err != nil {
		t.Fatal(err)
	}
	if m.Addr != "mail.example.com:465" || m.From != "noreply@example.com" || !m.ImplicitTLS || m.Username != "wrenn" || m.Password != "p@ss:word" {
		t.Fatalf("mailer %+v", m)
	}
	t.Setenv("CP_PUBLIC_URL", "https://app.example.com")
	t.Setenv("WRENN_PUBLIC_URL", "")
	if publicURL() != "https://app.example.com" {
		t.Fatalf("public URL %q", publicURL())
	}
}
