// Package version reports the build's version, set at link time by the
// Makefile (-ldflags "-X github.com/wrenn/wrenn/internal/version.Version=...").
package version

// Version is the release or git description of this build.
var Version = "dev"

// EnvdE2BLevel is the E2B envd version whose features this envd has:
// what the E2B SDKs are told (envdVersion) to pick the calls they make.
// 0.6.4 brings file metadata (0.6.2), entries in watch events (0.6.3) and
// watches on network mounts (0.6.4), on top of stdin control, the
// default user and raw and gzip uploads.
const EnvdE2BLevel = "0.6.4"
