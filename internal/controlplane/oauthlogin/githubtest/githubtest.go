// Package githubtest is a stand-in for GitHub's OAuth app endpoints and
// the two REST calls sign-in makes, for tests on a machine without the
// internet. It follows GitHub's documented web application flow: the
// authorize page sends the browser back with code and state, the token
// endpoint answers form-encoded unless asked for JSON and reports a bad
// code with HTTP 200 and an error field, and /user and /user/emails need
// the bearer token.
package githubtest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
)

// Account is who signs in at the stand-in.
type Account struct {
	ID       int64
	Login    string
	Name     string
	Email    string // the primary email
	Verified bool
}

// Server is the stand-in; Approve chooses who the next sign-in is.
type Server struct {
	*httptest.Server
	ClientID, ClientSecret string

	mu        sync.Mutex
	next      Account
	deny      bool
	codes     map[string]Account // code -> account, used once
	tokens    map[string]Account
	redirects map[string]string // code -> redirect_uri it was issued for
}

// New starts a stand-in for an OAuth app with these credentials.
func New(clientID, clientSecret string) *Server {
	s := &Server{ClientID: clientID, ClientSecret: clientSecret, codes: map[string]Account{}, tokens: map[string]Account{}, redirects: map[string]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /login/oauth/authorize", s.authorize)
	mux.HandleFunc("POST /login/oauth/access_token", s.accessToken)
	mux.HandleFunc("GET /user", s.user)
	mux.HandleFunc("GET /user/emails", s.emails)
	s.Server = httptest.NewServer(mux)
	return s
}

// Approve makes the next sign-ins those of a.
func (s *Server) Approve(a Account) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.next, s.deny = a, false
}

// Deny makes the next sign-in refused by the user ("Cancel" on GitHub's page).
func (s *Server) Deny() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deny = true
}

func random() string {
	var b [10]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (s *Server) authorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("client_id") != s.ClientID {
		http.Error(w, "unknown client_id", http.StatusNotFound)
		return
	}
	back, err := url.Parse(q.Get("redirect_uri"))
	if err != nil || back.Scheme == "" {
		http.Error(w, "redirect_uri is required", http.StatusBadRequest)
		return
	}
	answer := back.Query()
	s.mu.Lock()
	if s.deny {
		answer.Set("error", "access_denied")
		answer.Set("error_description", "The user has denied your application access.")
	} else {
		code := random()
		s.codes[code] = s.next
		s.redirects[code] = back.String()
		answer.Set("code", code)
	}
	s.mu.Unlock()
	answer.Set("state", q.Get("state"))
	back.RawQuery = answer.Encode()
	http.Redirect(w, r, back.String(), http.StatusFound)
}

func (s *Server) accessToken(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	id, secret, ok := r.BasicAuth()
	if !ok {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	answer := url.Values{}
	code := r.PostForm.Get("code")
	s.mu.Lock()
	a, found := s.codes[code]
	redirect := s.redirects[code]
	delete(s.codes, code)
	switch {
	case id != s.ClientID || secret != s.ClientSecret:
		answer.Set("error", "incorrect_client_credentials")
	case !found || (r.PostForm.Get("redirect_uri") != "" && r.PostForm.Get("redirect_uri") != redirect):
		answer.Set("error", "bad_verification_code")
		answer.Set("error_description", "The code passed is incorrect or expired.")
	default:
		tok := "gho_" + random()
		s.tokens[tok] = a
		answer.Set("access_token", tok)
		answer.Set("scope", "read:user,user:email")
		answer.Set("token_type", "bearer")
	}
	s.mu.Unlock()
	if strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header().Set("Content-Type", "application/json")
		out := map[string]string{}
		for k := range answer {
			out[k] = answer.Get(k)
		}
		_ = json.NewEncoder(w).Encode(out)
		return
	}
	w.Header().Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	_, _ = w.Write([]byte(answer.Encode()))
}

func (s *Server) account(w http.ResponseWriter, r *http.Request) (Account, bool) {
	h := r.Header.Get("Authorization")
	tok := strings.TrimPrefix(strings.TrimPrefix(h, "Bearer "), "token ")
	s.mu.Lock()
	a, ok := s.tokens[tok]
	s.mu.Unlock()
	if !ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"message":"Requires authentication"}`))
	}
	return a, ok
}

func (s *Server) user(w http.ResponseWriter, r *http.Request) {
	a, ok := s.account(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	// The public profile email is often null: sign-in must ask /user/emails.
	_ = json.NewEncoder(w).Encode(map[string]any{"id": a.ID, "login": a.Login, "name": a.Name, "email": nil})
}

func (s *Server) emails(w http.ResponseWriter, r *http.Request) {
	a, ok := s.account(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode([]map[string]any{
		{"email": a.Login + "@users.noreply.github.com", "primary": false, "verified": true, "visibility": nil},
		{"email": a.Email, "primary": true, "verified": a.Verified, "visibility": "private"},
	})
}
