package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Config is what `wrenn login` saves: where the control plane is and
// how to authenticate to it.
type Config struct {
	URL    string `json:"url"`
	APIKey string `json:"api_key,omitempty"`
	// Token is a user JWT (from email and password) for the account,
	// host and key commands; it expires.
	Token        string    `json:"token,omitempty"`
	TokenExpires time.Time `json:"token_expires,omitempty"`
}

// DefaultURL is the control plane of a local `make dev`.
const DefaultURL = "http://localhost:8000"

// configPath is $WRENN_CONFIG, else $XDG_CONFIG_HOME/wrenn/config.json,
// else ~/.config/wrenn/config.json.
func configPath() (string, error) {
	if p := os.Getenv("WRENN_CONFIG"); p != "" {
		return p, nil
	}
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find the config directory: %w", err)
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "wrenn", "config.json"), nil
}

// loadConfig reads the saved config (empty if none), then applies
// WRENN_URL and WRENN_API_KEY.
func loadConfig() (Config, error) {
	var c Config
	p, err := configPath()
	if err != nil {
		return c, err
	}
	data, err := os.ReadFile(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return c, fmt.Errorf("read %s: %w", p, err)
	default:
		if err := json.Unmarshal(data, &c); err != nil {
			return c, fmt.Errorf("%s is not valid JSON: %w", p, err)
		}
	}
	if v := os.Getenv("WRENN_URL"); v != "" {
		c.URL = v
	}
	if v := os.Getenv("WRENN_API_KEY"); v != "" {
		c.APIKey = v
	}
	if c.URL == "" {
		c.URL = DefaultURL
	}
	return c, nil
}

// SaveConfig writes the config readable by its owner only (it holds
// credentials). `make dev` uses it too.
func SaveConfig(c Config) (string, error) {
	p, err := configPath()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return "", fmt.Errorf("create %s: %w", filepath.Dir(p), err)
	}
	data, _ := json.MarshalIndent(c, "", "  ")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return "", fmt.Errorf("save %s: %w", p, err)
	}
	return p, nil
}
