package wrenn

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

// Capsule is a sandbox as the API reports it.
type Capsule struct {
	ID     string `json:"id"`
	Status string `json:"status"` // pending, starting, running, paused, hibernated, stopped, missing, error (upstream Wrenn's set)
	// StatusDetail adds the transitions: pausing, resuming, stopping.
	StatusDetail string            `json:"status_detail"`
	Template     string            `json:"template"`
	VCPUs        int               `json:"vcpus"`
	MemoryMB     int               `json:"memory_mb"`
	DiskSizeMB   *int              `json:"disk_size_mb"`
	TimeoutSec   int               `json:"timeout_sec"`
	AutoPause    bool              `json:"auto_pause"`
	HostID       string            `json:"host_id,omitempty"`
	CreatedAt    time.Time         `json:"created_at"`
	StartedAt    *time.Time        `json:"started_at"`
	LastActiveAt *time.Time        `json:"last_active_at"`
	Metadata     map[string]string `json:"metadata"`
	Egress       Egress            `json:"egress"`
	StatusReason string            `json:"status_reason,omitempty"`
	// StartedFrom is "memory" when the capsule was restored from its
	// template's memory (no boot), "boot" otherwise; BootNote says why a
	// capsule whose template has memory booted.
	StartedFrom string `json:"started_from,omitempty"`
	BootNote    string `json:"boot_note,omitempty"`
	// Public: the capsule's ports answer anyone through the ingress.
	Public bool `json:"public"`
	// AutoResume: traffic to a paused capsule resumes it.
	AutoResume bool `json:"auto_resume"`
	// Domain and URLScheme make port URLs: <scheme>://<port>-<id>.<domain> (see URL).
	Domain    string `json:"domain"`
	URLScheme string `json:"url_scheme"`
	// EnvdAccessToken is envd's token (X-Access-Token), for clients that
	// talk to envd directly; TrafficAccessToken opens the ports of a
	// capsule that is not public (E2b-Traffic-Access-Token header). Both
	// come with GetCapsule and a create that waits.
	EnvdAccessToken    string `json:"envd_access_token,omitempty"`
	TrafficAccessToken string `json:"traffic_access_token,omitempty"`
}

// URL is the address of a port in the capsule through the control
// plane's ingress.
func (cp Capsule) URL(port int) string {
	scheme := cp.URLScheme
	if scheme == "" {
		scheme = "https"
	}
	return fmt.Sprintf("%s://%d-%s.%s", scheme, port, cp.ID, cp.Domain)
}

// Port is a port a server in a capsule listens on.
type Port struct {
	Port      int      `json:"port"`
	Addresses []string `json:"addresses"`
	// Forwarded: the server listens on loopback only and is reached
	// through envd's forward.
	Forwarded bool   `json:"forwarded"`
	PID       int    `json:"pid,omitempty"`
	Command   string `json:"command,omitempty"`
	URL       string `json:"url"`
}

// ListPorts lists the ports servers in a running capsule listen on, with
// their URLs.
func (c *Client) ListPorts(ctx context.Context, id string) ([]Port, error) {
	var out []Port
	err := c.do(ctx, http.MethodGet, "/v1/capsules/"+url.PathEscape(id)+"/ports", nil, &out)
	return out, err
}

// Egress is a capsule's outbound policy: Mode "allow_all" (the public
// internet but Deny), "deny_all", or "allow_list" (Allow only). Private
// networks need the host operator's allowance whatever it says.
type Egress struct {
	Mode  string   `json:"mode"`
	Allow []string `json:"allow,omitempty"`
	Deny  []string `json:"deny,omitempty"`
}

// CreateCapsuleParams describe a new capsule; zero values take the
// server's defaults (template minimal, 1 vCPU, 512 MB, no timeout).
type CreateCapsuleParams struct {
	Template   string            `json:"template,omitempty"`
	VCPUs      int               `json:"vcpus,omitempty"`
	MemoryMB   int               `json:"memory_mb,omitempty"`
	DiskSizeMB int               `json:"disk_size_mb,omitempty"`
	TimeoutSec int               `json:"timeout_sec,omitempty"` // idle seconds before auto-pause
	AutoPause  *bool             `json:"auto_pause,omitempty"`  // false: destroy instead of pause at the timeout
	Envs       map[string]string `json:"envs,omitempty"`
	Metadata   map[string]string `json:"metadata,omitempty"`
	HostTags   []string          `json:"host_tags,omitempty"`
	// BYOC places the capsule on one of the team's own hosts (a team a
	// platform admin enabled for BYOC).
	BYOC bool `json:"byoc,omitempty"`
	// Egress is what the capsule may reach; the zero value is the public
	// internet.
	Egress *Egress `json:"egress,omitempty"`
	// Public opens the capsule's ports to anyone through the ingress;
	// otherwise they need the team's credentials or its traffic token.
	Public bool `json:"public,omitempty"`
	// AutoResume resumes the capsule, when paused, on ingress traffic.
	AutoResume bool `json:"auto_resume,omitempty"`
	// Wait returns once the capsule runs (or failed) instead of at once
	// with status "starting".
	Wait bool `json:"-"`
}

// CreateCapsule starts a capsule.
func (c *Client) CreateCapsule(ctx context.Context, p CreateCapsuleParams) (Capsule, error) {
	path := "/v1/capsules"
	if p.Wait {
		path += "?wait=true"
	}
	var out Capsule
	err := c.do(ctx, http.MethodPost, path, p, &out)
	return out, err
}

// ListCapsulesParams filter a listing.
type ListCapsulesParams struct {
	Statuses []string          // default: every live state
	Metadata map[string]string // every pair must match
}

// ListCapsules lists the team's capsules, newest first.
func (c *Client) ListCapsules(ctx context.Context, p ListCapsulesParams) ([]Capsule, error) {
	q := url.Values{}
	for i, s := range p.Statuses {
		if i == 0 {
			q.Set("status", s)
		} else {
			q.Set("status", q.Get("status")+","+s)
		}
	}
	for k, v := range p.Metadata {
		q.Set("metadata."+k, v)
	}
	path := "/v1/capsules"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out []Capsule
	err := c.do(ctx, http.MethodGet, path, nil, &out)
	return out, err
}

// GetCapsule returns one capsule.
func (c *Client) GetCapsule(ctx context.Context, id string) (Capsule, error) {
	var out Capsule
	err := c.do(ctx, http.MethodGet, "/v1/capsules/"+url.PathEscape(id), nil, &out)
	return out, err
}

// DestroyCapsule destroys a capsule and everything in it. The capsule is
// stopped when it returns, or stopping (its host could not be reached:
// the control plane ends it when the host is back).
func (c *Client) DestroyCapsule(ctx context.Context, id string) (Capsule, error) {
	out := Capsule{ID: id, Status: "stopped"} // what 204 No Content means
	err := c.do(ctx, http.MethodDelete, "/v1/capsules/"+url.PathEscape(id), nil, &out)
	return out, err
}

// PauseCapsule snapshots a running capsule's memory and disk and stops it.
func (c *Client) PauseCapsule(ctx context.Context, id string) (Capsule, error) {
	var out Capsule
	err := c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/pause", nil, &out)
	return out, err
}

// ForkCapsule makes count new capsules (1 to 16) with a running capsule's
// memory and disk as they are now; the capsule pauses only for the copy.
// Each has its own id and tokens (returned as GetCapsule returns them).
func (c *Client) ForkCapsule(ctx context.Context, id string, count int) ([]Capsule, error) {
	var out struct {
		Capsules []Capsule `json:"capsules"`
	}
	err := c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/fork", map[string]int{"count": count}, &out)
	return out.Capsules, err
}

// ResumeCapsule brings a paused capsule back with its memory intact.
func (c *Client) ResumeCapsule(ctx context.Context, id string) (Capsule, error) {
	var out Capsule
	err := c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/resume", nil, &out)
	return out, err
}

// Ping resets a capsule's inactivity timer.
func (c *Client) Ping(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/ping", nil, nil)
}

// SetTimeout sets a capsule's inactivity timeout (0: none) and resets
// its timer.
func (c *Client) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	return c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/ping", map[string]int{"timeout_sec": int(timeout.Seconds())}, nil)
}
