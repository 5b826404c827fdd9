package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Route is what the ingress needs to send a request into a capsule: its
// team, state and rules, and the host that runs it.
type Route struct {
	ID         string  `db:"id"`
	TeamID     string  `db:"team_id"`
	Status     string  `db:"status"`
	Public     bool    `db:"public"`
	AutoResume bool    `db:"auto_resume"`
	AutoPause  bool    `db:"auto_pause"`
	TimeoutSec int32   `db:"timeout_sec"`
	HostID     *string `db:"host_id"`
	// EndAt is an absolute deadline (E2B's timeout), nil for none.
	EndAt *time.Time `db:"end_at"`
	// TrafficToken opens the capsule's ports to whoever holds it.
	TrafficToken string `db:"traffic_token"`
	// The host: its type, address and agent token ("" when unregistered).
	HostType    string `db:"host_type"`
	HostAddress string `db:"host_address"`
	HostToken   string `db:"host_token"`
}

// IngressRoute returns the route into capsule id, with its traffic token
// and its host's token opened, in one read.
func (s *Store) IngressRoute(ctx context.Context, id string) (Route, error) {
	rows, _ := s.Pool.Query(ctx, `SELECT s.id, s.team_id, s.status, s.public, s.auto_resume, s.auto_pause, s.timeout_sec, s.host_id, s.end_at,
		coalesce(s.traffic_token, '') AS traffic_token, coalesce(h.type, '') AS host_type,
		coalesce(h.address, '') AS host_address, coalesce(h.agent_token, '') AS host_token
		FROM sandboxes s LEFT JOIN hosts h ON h.id = s.host_id WHERE s.id = $1`, id)
	r, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Route])
	if err != nil {
		return r, mapErr(err, "capsule")
	}
	for _, f := range []*string{&r.TrafficToken, &r.HostToken} {
		if *f != "" {
			if *f, err = s.unseal(*f); err != nil {
				return r, fmt.Errorf("capsule %s route: %w", id, err)
			}
		}
	}
	return r, nil
}

// CapsuleTokens are the credentials a capsule's team uses to reach it
// directly: envd's access token and the ports' traffic token.
type CapsuleTokens struct {
	Envd    string
	Traffic string
}

// SandboxTokens returns capsule id's tokens ("" for one never set).
func (s *Store) SandboxTokens(ctx context.Context, id string) (CapsuleTokens, error) {
	var envd, traffic string
	err := s.Pool.QueryRow(ctx, "SELECT coalesce(envd_token, ''), coalesce(traffic_token, '') FROM sandboxes WHERE id = $1", id).Scan(&envd, &traffic)
	if err != nil {
		return CapsuleTokens{}, mapErr(err, "capsule")
	}
	var t CapsuleTokens
	for _, f := range []struct {
		in  string
		out *string
	}{{envd, &t.Envd}, {traffic, &t.Traffic}} {
		if f.in == "" {
			continue
		}
		if *f.out, err = s.unseal(f.in); err != nil {
			return CapsuleTokens{}, fmt.Errorf("capsule %s token: %w", id, err)
		}
	}
	return t, nil
}
