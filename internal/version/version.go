// Package version reports the build's version, set at link time by the
// Makefile (-ldflags "-X github.com/wrenn/wrenn/internal/version.Version=...").
package version

// Version is the release or git description of this build.
var Version = "dev"
