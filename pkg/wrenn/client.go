// Package wrenn is the Go client of the Wrenn API: capsules (sandboxes),
// commands, terminals, files, templates, hosts and API keys. Every call
// takes a context; errors from the API are *APIError values.
//
//	c, err := wrenn.New("http://localhost:8000", wrenn.WithAPIKey(os.Getenv("WRENN_API_KEY")))
//	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "minimal"})
//	res, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "echo", Args: []string{"hi"}})
package wrenn

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls one Wrenn control plane. It is safe for concurrent use.
type Client struct {
	base   *url.URL
	apiKey string
	token  string
	http   *http.Client
}

// Option configures a Client.
type Option func(*Client)

// WithAPIKey authenticates with a team API key (wrn_...).
func WithAPIKey(key string) Option { return func(c *Client) { c.apiKey = key } }

// WithToken authenticates with a user JWT (from Login), which account,
// team, host and key routes need.
func WithToken(jwt string) Option { return func(c *Client) { c.token = jwt } }

// WithHTTPClient replaces the HTTP client (timeouts, proxies, TLS).
func WithHTTPClient(h *http.Client) Option { return func(c *Client) { c.http = h } }

// New returns a client for the control plane at baseURL.
func New(baseURL string, opts ...Option) (*Client, error) {
	u, err := url.Parse(strings.TrimRight(baseURL, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("wrenn: base URL %q must be http(s)://host[:port]", baseURL)
	}
	c := &Client{base: u, http: &http.Client{}}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// BaseURL is the control plane's URL.
func (c *Client) BaseURL() string { return c.base.String() }

// APIError is an error answer of the API: {"error":{"code","message"}}.
type APIError struct {
	Status  int    // HTTP status
	Code    string // e.g. not_found, invalid_state, invalid_request, rate_limited
	Message string
	// RetryAfter is set on 429 answers.
	RetryAfter time.Duration
	// TimedOut: a command ran out of its timeout and was killed.
	TimedOut bool
}

func (e *APIError) Error() string {
	return fmt.Sprintf("wrenn: %s (%d %s)", e.Message, e.Status, e.Code)
}

// IsNotFound reports whether err is a 404 from the API (a missing object,
// or another team's, which the API does not tell apart).
func IsNotFound(err error) bool { return statusIs(err, http.StatusNotFound) }

// IsConflict reports whether err is a 409: the object is in the wrong
// state (a paused capsule asked to run a command) or the name is taken.
func IsConflict(err error) bool { return statusIs(err, http.StatusConflict) }

// IsUnauthorized reports whether err is a 401: missing or bad credentials.
func IsUnauthorized(err error) bool { return statusIs(err, http.StatusUnauthorized) }

func statusIs(err error, status int) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == status
}

// newRequest builds an authenticated request for path (with query).
func (c *Client) newRequest(ctx context.Context, method, path string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base.String()+path, body)
	if err != nil {
		return nil, fmt.Errorf("wrenn: %w", err)
	}
	c.authorize(req.Header)
	req.Header.Set("User-Agent", "wrenn-go")
	return req, nil
}

func (c *Client) authorize(h http.Header) {
	if c.apiKey != "" {
		h.Set("X-API-Key", c.apiKey)
	}
	if c.token != "" {
		h.Set("Authorization", "Bearer "+c.token)
	}
}

// do sends a JSON request and decodes a JSON answer into out (nil: ignore).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("wrenn: encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := c.newRequest(ctx, method, path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("wrenn: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if err := checkResponse(resp); err != nil {
		return err
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("wrenn: decode %s %s answer: %w", method, path, err)
	}
	return nil
}

// checkResponse turns a non-2xx answer into an *APIError.
func checkResponse(resp *http.Response) error {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	ae := &APIError{Status: resp.StatusCode, Code: "http_" + fmt.Sprint(resp.StatusCode), Message: strings.TrimSpace(string(data))}
	var e struct {
		Error struct {
			Code, Message string
			TimedOut      bool `json:"timed_out"`
		} `json:"error"`
	}
	if json.Unmarshal(data, &e) == nil && e.Error.Code != "" {
		ae.Code, ae.Message, ae.TimedOut = e.Error.Code, e.Error.Message, e.Error.TimedOut
	}
	if ae.Message == "" {
		ae.Message = resp.Status
	}
	if s := resp.Header.Get("Retry-After"); s != "" {
		if n, err := time.ParseDuration(s + "s"); err == nil {
			ae.RetryAfter = n
		}
	}
	return ae
}

// AuthResult is a login's answer.
type AuthResult struct {
	Token   string `json:"token"`
	UserID  string `json:"user_id"`
	TeamID  string `json:"team_id"`
	Email   string `json:"email"`
	Name    string `json:"name"`
	IsAdmin bool   `json:"is_admin"`
}

// Login exchanges an email and password for a user JWT (valid 6 hours);
// use it with WithToken.
func (c *Client) Login(ctx context.Context, email, password string) (AuthResult, error) {
	var out AuthResult
	err := c.do(ctx, http.MethodPost, "/v1/auth/login", map[string]string{"email": email, "password": password}, &out)
	return out, err
}

// Signup creates an account (active at once unless the server mails
// activation links).
func (c *Client) Signup(ctx context.Context, email, password, name string) error {
	return c.do(ctx, http.MethodPost, "/v1/auth/signup", map[string]string{"email": email, "password": password, "name": name}, nil)
}
