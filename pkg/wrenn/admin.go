package wrenn

import (
	"context"
	"net/http"
	"net/url"
	"time"
)

// Host is a machine running wrenn-agent.
type Host struct {
	ID              string     `json:"id"`
	Type            string     `json:"type"`
	Status          string     `json:"status"` // pending, online, unreachable, ...
	Address         *string    `json:"address"`
	Arch            *string    `json:"arch"`
	CPUCores        *int       `json:"cpu_cores"`
	MemoryMB        *int       `json:"memory_mb"`
	DiskGB          *int       `json:"disk_gb"`
	VMM             *string    `json:"vmm"`
	Version         *string    `json:"version"`
	Tags            []string   `json:"tags"`
	LastHeartbeatAt *time.Time `json:"last_heartbeat_at"`
	CreatedAt       time.Time  `json:"created_at"`
}

// ListHosts lists the hosts the caller may see (a user token is needed).
func (c *Client) ListHosts(ctx context.Context) ([]Host, error) {
	var out []Host
	err := c.do(ctx, http.MethodGet, "/v1/hosts", nil, &out)
	return out, err
}

// CreateHost makes a host record and returns its one-time registration
// token (valid one hour) for `wrenn-agent --register`.
func (c *Client) CreateHost(ctx context.Context) (Host, string, error) {
	var out struct {
		Host              Host   `json:"host"`
		RegistrationToken string `json:"registration_token"`
	}
	err := c.do(ctx, http.MethodPost, "/v1/hosts", map[string]string{"type": "regular"}, &out)
	return out.Host, out.RegistrationToken, err
}

// APIKey is a team API key; Key is only set when it was just created.
type APIKey struct {
	ID           string  `json:"id"`
	Name         string  `json:"name"`
	KeyPrefix    string  `json:"key_prefix"`
	CreatedBy    *string `json:"created_by"`
	CreatorEmail *string `json:"creator_email"`
	// Active is false while the key's creator is deactivated.
	Active    bool       `json:"active"`
	CreatedAt time.Time  `json:"created_at"`
	LastUsed  *time.Time `json:"last_used"`
	Key       string     `json:"key,omitempty"`
}

// ListAPIKeys lists the team's keys (never the keys themselves).
func (c *Client) ListAPIKeys(ctx context.Context) ([]APIKey, error) {
	var out []APIKey
	err := c.do(ctx, http.MethodGet, "/v1/api-keys", nil, &out)
	return out, err
}

// CreateAPIKey makes a key; its Key is shown this once.
func (c *Client) CreateAPIKey(ctx context.Context, name string, format ...KeyFormat) (APIKey, error) {
	body := map[string]string{"name": name}
	if len(format) > 0 && format[0] != "" {
		body["format"] = string(format[0])
	}
	var out APIKey
	err := c.do(ctx, http.MethodPost, "/v1/api-keys", body, &out)
	return out, err
}

// KeyFormat is how a new API key is written; both work everywhere.
type KeyFormat string

// Key formats: Wrenn's (wrn_...), and E2B's (e2b_ + 40 hex), which E2B's
// SDKs check for.
const (
	KeyFormatWrenn KeyFormat = "wrenn"
	KeyFormatE2B   KeyFormat = "e2b"
)

// RevokeAPIKey deletes a key; requests with it fail from then on.
func (c *Client) RevokeAPIKey(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/api-keys/"+url.PathEscape(id), nil, nil)
}
