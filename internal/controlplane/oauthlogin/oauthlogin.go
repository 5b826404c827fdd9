// Package oauthlogin signs users in through OAuth providers: the
// provider's authorization URL, the code exchange (golang.org/x/oauth2),
// the profile the provider vouches for, and the signed state that ties a
// provider's answer to the browser that asked.
package oauthlogin

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
)

// Profile is who the provider says signed in.
type Profile struct {
	ID    string // the provider's stable account id
	Email string // verified, lower-cased
	Name  string
}

// Provider is one OAuth sign-in provider.
type Provider interface {
	Name() string
	// AuthURL is where the browser goes to sign in; the provider sends
	// it back to the callback with state and a code.
	AuthURL(state string) string
	// Profile exchanges the code and asks the provider who signed in.
	Profile(ctx context.Context, code string) (Profile, error)
}

// GitHubConfig configures sign-in with GitHub (or GitHub Enterprise
// Server: WebURL https://ghe.example.com, APIURL https://ghe.example.com/api/v3).
type GitHubConfig struct {
	ClientID, ClientSecret string
	CallbackURL            string // <public URL>/auth/oauth/github/callback
	WebURL                 string // default https://github.com
	APIURL                 string // default https://api.github.com
	// HTTP calls the provider (default: a client with a 15 s timeout).
	HTTP *http.Client
}

// GitHub signs users in with a GitHub OAuth app.
type GitHub struct {
	cfg  oauth2.Config
	api  string
	http *http.Client
}

// NewGitHub is a GitHub provider.
func NewGitHub(c GitHubConfig) *GitHub {
	web := strings.TrimRight(c.WebURL, "/")
	if web == "" {
		web = "https://github.com"
	}
	api := strings.TrimRight(c.APIURL, "/")
	if api == "" {
		api = "https://api.github.com"
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 15 * time.Second}
	}
	return &GitHub{
		cfg: oauth2.Config{
			ClientID: c.ClientID, ClientSecret: c.ClientSecret, RedirectURL: c.CallbackURL,
			Endpoint: oauth2.Endpoint{AuthURL: web + "/login/oauth/authorize", TokenURL: web + "/login/oauth/access_token",
				AuthStyle: oauth2.AuthStyleInParams},
			Scopes: []string{"read:user", "user:email"},
		},
		api: api, http: hc,
	}
}

// Name is "github".
func (g *GitHub) Name() string { return "github" }

// AuthURL is GitHub's authorization page for state.
func (g *GitHub) AuthURL(state string) string { return g.cfg.AuthCodeURL(state) }

// maxAnswer bounds what is read of any answer from the provider.
const maxAnswer = 1 << 20

// Profile exchanges code for a token and reads the account and its
// verified primary email.
func (g *GitHub) Profile(ctx context.Context, code string) (Profile, error) {
	ctx = context.WithValue(ctx, oauth2.HTTPClient, g.http)
	tok, err := g.cfg.Exchange(ctx, code)
	if err != nil {
		return Profile{}, fmt.Errorf("github: exchange the code: %w", err)
	}
	client := g.cfg.Client(ctx, tok)
	var user struct {
		ID    int64  `json:"id"`
		Login string `json:"login"`
		Name  string `json:"name"`
	}
	if err := g.get(ctx, client, "/user", &user); err != nil {
		return Profile{}, err
	}
	if user.ID == 0 {
		return Profile{}, errors.New("github: /user named no account")
	}
	var emails []struct {
		Email    string `json:"email"`
		Primary  bool   `json:"primary"`
		Verified bool   `json:"verified"`
	}
	if err := g.get(ctx, client, "/user/emails", &emails); err != nil {
		return Profile{}, err
	}
	p := Profile{ID: strconv.FormatInt(user.ID, 10), Name: user.Name}
	if p.Name == "" {
		p.Name = user.Login
	}
	for _, e := range emails {
		if e.Primary && e.Verified {
			p.Email = strings.ToLower(strings.TrimSpace(e.Email))
		}
	}
	if p.Email == "" {
		return Profile{}, ErrNoVerifiedEmail
	}
	return p, nil
}

// ErrNoVerifiedEmail: the account has no verified primary email to sign
// up with.
var ErrNoVerifiedEmail = errors.New("the provider account has no verified primary email")

func (g *GitHub) get(ctx context.Context, client *http.Client, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, g.api+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/vnd.github+json")
	res, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("github: %s: %w", path, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, maxAnswer))
	if err != nil {
		return fmt.Errorf("github: %s: %w", path, err)
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("github: %s answered %d", path, res.StatusCode)
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("github: %s: %w", path, err)
	}
	return nil
}

// Intents of a sign-in: log in to an existing account, sign up (create
// one when none matches), or link the provider to a signed-in user.
const (
	IntentLogin  = "login"
	IntentSignup = "signup"
	IntentLink   = "link"
)

// State is what the browser carries (in a cookie) from the start of a
// sign-in to its callback; Nonce also travels through the provider.
type State struct {
	Nonce    string    `json:"n"`
	Provider string    `json:"p"`
	Intent   string    `json:"i"`
	UserID   string    `json:"u,omitempty"` // the user linking (IntentLink)
	Expires  time.Time `json:"e"`
}

// NewState is a fresh state for a sign-in that must end within ttl.
func NewState(provider, intent, userID string, ttl time.Duration) State {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return State{Nonce: hex.EncodeToString(b[:]), Provider: provider, Intent: intent, UserID: userID, Expires: time.Now().Add(ttl).UTC()}
}

// ErrBadState: a state that was not ours, was altered, or expired.
var ErrBadState = errors.New("the sign-in state is missing, altered or expired")

// Seal encodes s with a MAC under key.
func (s State) Seal(key []byte) string {
	body, _ := json.Marshal(s)
	enc := base64.RawURLEncoding.EncodeToString(body)
	return enc + "." + mac(key, enc)
}

// Open checks and decodes a sealed state.
func Open(key []byte, sealed string) (State, error) {
	enc, sum, ok := strings.Cut(sealed, ".")
	if !ok || !hmac.Equal([]byte(sum), []byte(mac(key, enc))) {
		return State{}, ErrBadState
	}
	body, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		return State{}, ErrBadState
	}
	var s State
	if err := json.Unmarshal(body, &s); err != nil || s.Nonce == "" || time.Now().After(s.Expires) {
		return State{}, ErrBadState
	}
	return s, nil
}

func mac(key []byte, data string) string {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(data))
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}
