package auth

import (
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Token lifetimes, as the public API documents them.
const (
	UserTokenTTL = 6 * time.Hour
	HostTokenTTL = 7 * 24 * time.Hour
)

// ErrInvalidToken covers every reason a JWT is refused; the reason is
// logged, not returned to the caller.
var ErrInvalidToken = errors.New("invalid or expired token")

// UserClaims is what a dashboard user's JWT says.
type UserClaims struct {
	TeamID  string `json:"team_id"`
	Email   string `json:"email"`
	Name    string `json:"name"`
	IsAdmin bool   `json:"is_admin"`
	Kind    string `json:"kind"`
	// Epoch is the user's session epoch when the token was issued; a
	// password change, reset or deactivation raises it, ending the token.
	Epoch int32 `json:"sep"`
	// Membership is the key of the user's membership of TeamID; removal
	// from the team ends it.
	Membership string `json:"mem"`
	jwt.RegisteredClaims
}

// HostClaims is what a host agent's JWT says.
type HostClaims struct {
	Kind string `json:"kind"`
	jwt.RegisteredClaims
}

// Signer issues and verifies HS256 JWTs with one secret shared by every
// control-plane replica (it lives in the database or the environment).
type Signer struct {
	Secret  []byte
	UserTTL time.Duration // default UserTokenTTL
	HostTTL time.Duration // default HostTokenTTL
	Now     func() time.Time
}

func (s *Signer) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

func (s *Signer) sign(claims jwt.Claims) (string, error) {
	t, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(s.Secret)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return t, nil
}

// UserToken issues a token for userID acting in teamID, valid while the
// user's session epoch is epoch and the membership (its key) lasts.
func (s *Signer) UserToken(userID, teamID, email, name string, isAdmin bool, epoch int32, membership string) (string, error) {
	ttl := s.UserTTL
	if ttl == 0 {
		ttl = UserTokenTTL
	}
	now := s.now()
	return s.sign(UserClaims{TeamID: teamID, Email: email, Name: name, IsAdmin: isAdmin, Kind: "user", Epoch: epoch, Membership: membership,
		RegisteredClaims: jwt.RegisteredClaims{Subject: userID, IssuedAt: jwt.NewNumericDate(now), ExpiresAt: jwt.NewNumericDate(now.Add(ttl)), Issuer: "wrenn"}})
}

// HostToken issues a host agent's token.
func (s *Signer) HostToken(hostID string) (string, error) {
	ttl := s.HostTTL
	if ttl == 0 {
		ttl = HostTokenTTL
	}
	now := s.now()
	return s.sign(HostClaims{Kind: "host",
		RegisteredClaims: jwt.RegisteredClaims{Subject: hostID, IssuedAt: jwt.NewNumericDate(now), ExpiresAt: jwt.NewNumericDate(now.Add(ttl)), Issuer: "wrenn",
			// A random ID makes every issued token distinct, even within one second.
			ID: RandomString(12)}})
}

func (s *Signer) parse(token string, claims jwt.Claims) error {
	_, err := jwt.ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return s.Secret, nil },
		jwt.WithValidMethods([]string{"HS256"}), jwt.WithIssuer("wrenn"), jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(s.now))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidToken, err)
	}
	return nil
}

// ParseUser verifies a user token.
func (s *Signer) ParseUser(token string) (*UserClaims, error) {
	var c UserClaims
	if err := s.parse(token, &c); err != nil {
		return nil, err
	}
	if c.Kind != "user" || c.Subject == "" || c.TeamID == "" {
		return nil, fmt.Errorf("%w: not a user token", ErrInvalidToken)
	}
	return &c, nil
}

// ParseHost verifies a host token.
func (s *Signer) ParseHost(token string) (*HostClaims, error) {
	var c HostClaims
	if err := s.parse(token, &c); err != nil {
		return nil, err
	}
	if c.Kind != "host" || c.Subject == "" {
		return nil, fmt.Errorf("%w: not a host token", ErrInvalidToken)
	}
	return &c, nil
}
