package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// Host is a machine running wrenn-agent.
type Host struct {
	ID               string     `db:"id"`
	Type             string     `db:"type"`
	TeamID           *string    `db:"team_id"`
	Provider         *string    `db:"provider"`
	AvailabilityZone *string    `db:"availability_zone"`
	Arch             *string    `db:"arch"`
	CPUCores         *int32     `db:"cpu_cores"`
	MemoryMB         *int32     `db:"memory_mb"`
	DiskGB           *int32     `db:"disk_gb"`
	Address          *string    `db:"address"`
	VMM              *string    `db:"vmm"`
	Version          *string    `db:"version"`
	Status           string     `db:"status"`
	AgentToken       *string    `db:"agent_token"`
	LastHeartbeatAt  *time.Time `db:"last_heartbeat_at"`
	CreatedBy        *string    `db:"created_by"`
	CreatedAt        time.Time  `db:"created_at"`
	UpdatedAt        time.Time  `db:"updated_at"`
	Tags             []string   `db:"tags"`
	// WarmPools is what the host last reported of its warm pools.
	WarmPools []WarmPool `db:"warm_pools"`
}

// WarmPool is one template's warm pool on a host, by the template's name
// there (see the API's agentTemplate).
type WarmPool struct {
	Template  string `json:"template"`
	Size      int    `json:"size"`
	Ready     int    `json:"ready"`
	Starting  int    `json:"starting"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	DiskMiB   int    `json:"disk_size_mib"`
	Claims    int64  `json:"claims"`
	Misses    int64  `json:"misses"`
	Note      string `json:"note,omitempty"`
}

// SetWarmPools records what a host reported of its warm pools.
func (s *Store) SetWarmPools(ctx context.Context, hostID string, pools []WarmPool) error {
	if pools == nil {
		pools = []WarmPool{}
	}
	_, err := s.Pool.Exec(ctx, "UPDATE hosts SET warm_pools = $2 WHERE id = $1", hostID, pools)
	return mapErr(err, "set warm pools")
}

// HostSpecs is what an agent reports about its machine.
type HostSpecs struct {
	Arch     string
	CPUCores int32
	MemoryMB int32
	DiskGB   int32
	Address  string
	VMM      string
	Version  string
}

const hostCols = `h.id, h.type, h.team_id, h.provider, h.availability_zone, h.arch, h.cpu_cores, h.memory_mb,
	h.disk_gb, h.address, h.vmm, h.version, h.status, h.agent_token, h.last_heartbeat_at, h.created_by,
	h.created_at, h.updated_at, h.warm_pools,
	coalesce((SELECT array_agg(tag ORDER BY tag) FROM host_tags WHERE host_id = h.id), '{}') AS tags`

// CreateHost stores a pending host and the hash of its registration token.
func (s *Store) CreateHost(ctx context.Context, h Host, tokenHash string, expires time.Time) (Host, error) {
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO hosts (id, type, team_id, provider, availability_zone, created_by)
			VALUES ($1, $2, $3, $4, $5, $6)`, h.ID, h.Type, h.TeamID, h.Provider, h.AvailabilityZone, h.CreatedBy); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "INSERT INTO host_registration_tokens (token_hash, host_id, expires_at) VALUES ($1, $2, $3)", tokenHash, h.ID, expires)
		return err
	})
	if err != nil {
		return Host{}, mapErr(err, "create host")
	}
	return s.Host(ctx, h.ID)
}

// Host returns one host.
func (s *Store) Host(ctx context.Context, id string) (Host, error) {
	rows, _ := s.Pool.Query(ctx, "SELECT "+hostCols+" FROM hosts h WHERE h.id = $1", id)
	h, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Host])
	if err == nil {
		err = s.openHost(&h)
	}
	return h, mapErr(err, "host")
}

// Hosts lists hosts: all of them, or one team's BYOC hosts.
func (s *Store) Hosts(ctx context.Context, teamID string) ([]Host, error) {
	q := "SELECT " + hostCols + " FROM hosts h"
	args := []any{}
	if teamID != "" {
		q += " WHERE h.team_id = $1"
		args = append(args, teamID)
	}
	rows, _ := s.Pool.Query(ctx, q+" ORDER BY h.created_at, h.id", args...)
	hs, err := pgx.CollectRows(rows, pgx.RowToStructByName[Host])
	for i := range hs {
		if err == nil {
			err = s.openHost(&hs[i])
		}
	}
	return hs, mapErr(err, "list hosts")
}

// NewRegistrationToken replaces a pending host's registration tokens.
func (s *Store) NewRegistrationToken(ctx context.Context, hostID, tokenHash string, expires time.Time) error {
	return mapErr(s.inTx(ctx, func(tx pgx.Tx) error {
		var status string
		if err := tx.QueryRow(ctx, "SELECT status FROM hosts WHERE id = $1 FOR UPDATE", hostID).Scan(&status); err != nil {
			return err
		}
		if status != "pending" {
			return ErrConflict
		}
		if _, err := tx.Exec(ctx, "DELETE FROM host_registration_tokens WHERE host_id = $1", hostID); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "INSERT INTO host_registration_tokens (token_hash, host_id, expires_at) VALUES ($1, $2, $3)", tokenHash, hostID, expires)
		return err
	}), "registration token")
}

// RegisterHost consumes a registration token (once, before it expires),
// records the specs and the agent's credentials, and marks the host
// online. check sees the host (its type and team) and may refuse, leaving
// the token unspent; mint is called inside the transaction with the
// host's ID.
func (s *Store) RegisterHost(ctx context.Context, tokenHash string, specs HostSpecs, check func(h Host, teamBYOC bool) error, mint func(hostID string) (jwt, refreshHash string, refreshExpires time.Time, err error)) (Host, error) {
	var hostID string
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `UPDATE host_registration_tokens SET used_at = now()
			WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now() RETURNING host_id`, tokenHash).Scan(&hostID); err != nil {
			return err
		}
		var h Host
		var teamBYOC bool
		if err := tx.QueryRow(ctx, `SELECT h.id, h.type, h.team_id, coalesce(t.is_byoc, false) FROM hosts h
			LEFT JOIN teams t ON t.id = h.team_id WHERE h.id = $1`, hostID).Scan(&h.ID, &h.Type, &h.TeamID, &teamBYOC); err != nil {
			return err
		}
		if err := check(h, teamBYOC); err != nil {
			return err
		}
		jwt, refreshHash, refreshExpires, err := mint(hostID)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE hosts SET arch = $2, cpu_cores = $3, memory_mb = $4, disk_gb = $5, address = $6,
			vmm = $7, version = $8, agent_token = $9, status = 'online', last_heartbeat_at = now(), updated_at = now() WHERE id = $1`,
			hostID, specs.Arch, specs.CPUCores, specs.MemoryMB, specs.DiskGB, specs.Address, specs.VMM, specs.Version, s.seal(jwt)); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "INSERT INTO host_refresh_tokens (token_hash, host_id, expires_at) VALUES ($1, $2, $3)", refreshHash, hostID, refreshExpires)
		return err
	})
	if err != nil {
		return Host{}, mapErr(err, "register host")
	}
	return s.Host(ctx, hostID)
}

// RefreshHost rotates a host's refresh token and records its new JWT.
func (s *Store) RefreshHost(ctx context.Context, refreshHash string, mint func(hostID string) (jwt, refreshHash string, refreshExpires time.Time, err error)) (Host, error) {
	var hostID string
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `UPDATE host_refresh_tokens SET revoked_at = now()
			WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > now() RETURNING host_id`, refreshHash).Scan(&hostID); err != nil {
			return err
		}
		jwt, next, expires, err := mint(hostID)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "UPDATE hosts SET agent_token = $2, updated_at = now() WHERE id = $1", hostID, s.seal(jwt)); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "INSERT INTO host_refresh_tokens (token_hash, host_id, expires_at) VALUES ($1, $2, $3)", next, hostID, expires)
		return err
	})
	if err != nil {
		return Host{}, mapErr(err, "refresh host token")
	}
	return s.Host(ctx, hostID)
}

// Heartbeat records that a registered host is alive; an unreachable host
// comes back online. It returns whether the host was unreachable before.
func (s *Store) Heartbeat(ctx context.Context, hostID string) (bool, error) {
	var was string
	err := s.Pool.QueryRow(ctx, `UPDATE hosts h SET last_heartbeat_at = now(), updated_at = now(),
			status = CASE WHEN h.status IN ('unreachable', 'offline') THEN 'online' ELSE h.status END
		FROM hosts old WHERE h.id = $1 AND old.id = h.id AND h.status <> 'pending' RETURNING old.status`, hostID).Scan(&was)
	if err != nil {
		return false, mapErr(err, "heartbeat")
	}
	return was == "unreachable" || was == "offline", nil
}

// MarkUnreachable flags online hosts silent for longer than silence and
// returns their IDs.
func (s *Store) MarkUnreachable(ctx context.Context, silence time.Duration) ([]string, error) {
	rows, _ := s.Pool.Query(ctx, `UPDATE hosts SET status = 'unreachable', updated_at = now()
		WHERE status = 'online' AND last_heartbeat_at < now() - $1::interval RETURNING id`, silence.String())
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	return ids, mapErr(err, "mark unreachable")
}

// SetHostStatus sets a registered host's status (draining, online).
func (s *Store) SetHostStatus(ctx context.Context, hostID, status string) error {
	return s.execOne(ctx, "host status", "UPDATE hosts SET status = $2, updated_at = now() WHERE id = $1 AND status <> 'pending'", hostID, status)
}

// DeleteHost removes a host; its tokens go with it, so the agent's
// credentials stop working at once.
func (s *Store) DeleteHost(ctx context.Context, hostID string) error {
	return s.execOne(ctx, "delete host", "DELETE FROM hosts WHERE id = $1", hostID)
}

// AddHostTag tags a host.
func (s *Store) AddHostTag(ctx context.Context, hostID, tag string) error {
	_, err := s.Pool.Exec(ctx, "INSERT INTO host_tags (host_id, tag) VALUES ($1, $2) ON CONFLICT DO NOTHING", hostID, tag)
	return mapErr(err, "add tag")
}

// RemoveHostTag untags a host.
func (s *Store) RemoveHostTag(ctx context.Context, hostID, tag string) error {
	return s.execOne(ctx, "remove tag", "DELETE FROM host_tags WHERE host_id = $1 AND tag = $2", hostID, tag)
}

// HostLoad is a schedulable host with what its live capsules reserve.
type HostLoad struct {
	Host
	ReservedMB    int64 `db:"reserved_mb"`
	ReservedVCPUs int64 `db:"reserved_vcpus"`
	Running       int64 `db:"running"`
}

// SchedulableHosts lists online hosts a team may use (shared hosts, and
// its own BYOC hosts when a platform admin enabled BYOC for it) with their
// reservations. Other teams' BYOC hosts are never listed. teamBYOC
// reports whether the team is enabled for BYOC (read in the same query;
// false when no host is listed).
func (s *Store) SchedulableHosts(ctx context.Context, teamID string) (hosts []HostLoad, teamBYOC bool, err error) {
	rows, _ := s.Pool.Query(ctx, `SELECT `+hostCols+`,
		coalesce((SELECT t.is_byoc FROM teams t WHERE t.id = $1), false) AS team_byoc,
		coalesce(sum(sb.memory_mb) FILTER (WHERE sb.status IN ('pending', 'starting', 'running', 'pausing', 'resuming')), 0)::bigint AS reserved_mb,
		coalesce(sum(sb.vcpus) FILTER (WHERE sb.status IN ('pending', 'starting', 'running', 'pausing', 'resuming')), 0)::bigint AS reserved_vcpus,
		count(sb.id) FILTER (WHERE sb.status IN ('pending', 'starting', 'running', 'pausing', 'resuming'))::bigint AS running
		FROM hosts h LEFT JOIN sandboxes sb ON sb.host_id = h.id
		WHERE h.status = 'online' AND h.address IS NOT NULL AND (h.type = 'regular' OR
			(h.type = 'byoc' AND h.team_id = $1 AND EXISTS (SELECT 1 FROM teams t WHERE t.id = $1 AND t.is_byoc)))
		GROUP BY h.id ORDER BY h.id`, teamID)
	type row struct {
		HostLoad
		TeamBYOC bool `db:"team_byoc"`
	}
	rs, err := pgx.CollectRows(rows, pgx.RowToStructByName[row])
	for _, r := range rs {
		if err == nil {
			err = s.openHost(&r.Host)
		}
		hosts, teamBYOC = append(hosts, r.HostLoad), r.TeamBYOC
	}
	return hosts, teamBYOC, mapErr(err, "schedulable hosts")
}
