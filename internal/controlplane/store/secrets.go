package store

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/wrenn/wrenn/internal/controlplane/seal"
)

// The secrets the store keeps sealed (package seal) when the store has a
// keyring: settings (the JWT signing secret), hosts' agent tokens,
// capsules' envd and traffic tokens and every value of a channel's config
// (webhook URLs and secrets, chat tokens). Reads open them; values stored before sealing, or sealed with
// an older key, are sealed again by ResealSecrets.

func (s *Store) seal(v string) string {
	if s.Secrets == nil {
		return v
	}
	return s.Secrets.Seal(v)
}

func (s *Store) unseal(v string) (string, error) {
	if s.Secrets == nil {
		if seal.Sealed(v) {
			return "", fmt.Errorf("a sealed secret, and no encryption key to open it")
		}
		return v, nil
	}
	plain, _, err := s.Secrets.Open(v)
	return plain, err
}

func (s *Store) sealMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = s.seal(v)
	}
	return out
}

func (s *Store) unsealMap(m map[string]string) error {
	for k, v := range m {
		plain, err := s.unseal(v)
		if err != nil {
			return fmt.Errorf("config %s: %w", k, err)
		}
		m[k] = plain
	}
	return nil
}

func (s *Store) openHost(h *Host) error {
	if h.AgentToken == nil {
		return nil
	}
	plain, err := s.unseal(*h.AgentToken)
	if err != nil {
		return fmt.Errorf("host %s token: %w", h.ID, err)
	}
	h.AgentToken = &plain
	return nil
}

func (s *Store) openChannels(chs []Channel) error {
	for i := range chs {
		if err := s.unsealMap(chs[i].Config); err != nil {
			return fmt.Errorf("channel %s: %w", chs[i].ID, err)
		}
	}
	return nil
}

// resealLock keeps two replicas from resealing at once.
const resealLock = 0x77726e6e00000020

// ResealSecrets seals every secret that is stored in the clear or sealed
// with an older key with the current key, and returns how many it
// sealed. A secret sealed with a key the keyring lacks is an error that
// names the key, before anything else starts.
func (s *Store) ResealSecrets(ctx context.Context) (int, error) {
	if s.Secrets == nil {
		return 0, nil
	}
	n := 0
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(resealLock)); err != nil {
			return err
		}
		// reseal returns v sealed afresh, or "" when it is current.
		reseal := func(what, v string) (string, error) {
			plain, stale, err := s.Secrets.Open(v)
			if err != nil {
				return "", fmt.Errorf("%s: %w (is WRENN_ENCRYPTION_OLD_KEYS missing a key?)", what, err)
			}
			if !stale {
				return "", nil
			}
			n++
			return s.Secrets.Seal(plain), nil
		}
		type row struct{ id, value string }
		collect := func(sql string) ([]row, error) {
			rows, err := tx.Query(ctx, sql)
			if err != nil {
				return nil, err
			}
			return pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
				var x row
				return x, r.Scan(&x.id, &x.value)
			})
		}
		settings, err := collect("SELECT key, value FROM settings")
		if err != nil {
			return err
		}
		for _, r := range settings {
			if v, err := reseal("setting "+r.id, r.value); err != nil {
				return err
			} else if v != "" {
				if _, err := tx.Exec(ctx, "UPDATE settings SET value = $2 WHERE key = $1", r.id, v); err != nil {
					return err
				}
			}
		}
		hosts, err := collect("SELECT id, agent_token FROM hosts WHERE agent_token IS NOT NULL")
		if err != nil {
			return err
		}
		for _, r := range hosts {
			if v, err := reseal("host "+r.id+" token", r.value); err != nil {
				return err
			} else if v != "" {
				if _, err := tx.Exec(ctx, "UPDATE hosts SET agent_token = $2 WHERE id = $1", r.id, v); err != nil {
					return err
				}
			}
		}
		for _, col := range []string{"envd_token", "traffic_token"} {
			tokens, err := collect("SELECT id, " + col + " FROM sandboxes WHERE " + col + " IS NOT NULL")
			if err != nil {
				return err
			}
			for _, r := range tokens {
				if v, err := reseal("capsule "+r.id+" "+col, r.value); err != nil {
					return err
				} else if v != "" {
					if _, err := tx.Exec(ctx, "UPDATE sandboxes SET "+col+" = $2 WHERE id = $1", r.id, v); err != nil {
						return err
					}
				}
			}
		}
		rows, err := tx.Query(ctx, "SELECT id, config FROM channels")
		if err != nil {
			return err
		}
		type channel struct {
			id     string
			config map[string]string
		}
		chs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (channel, error) {
			var c channel
			return c, r.Scan(&c.id, &c.config)
		})
		if err != nil {
			return err
		}
		for _, c := range chs {
			changed := false
			for k, v := range c.config {
				sealed, err := reseal("channel "+c.id+" "+k, v)
				if err != nil {
					return err
				}
				if sealed != "" {
					c.config[k], changed = sealed, true
				}
			}
			if changed {
				if _, err := tx.Exec(ctx, "UPDATE channels SET config = $2 WHERE id = $1", c.id, c.config); err != nil {
					return err
				}
			}
		}
		return nil
	})
	return n, mapErr(err, "reseal secrets")
}
