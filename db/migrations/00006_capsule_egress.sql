-- +goose Up

-- A capsule's egress policy as its creator asked for it (the host enforces
-- it, on top of the operator's rules for private networks).
ALTER TABLE sandboxes ADD COLUMN egress jsonb NOT NULL DEFAULT '{"mode": "allow_all"}';

-- +goose Down
ALTER TABLE sandboxes DROP COLUMN egress;
